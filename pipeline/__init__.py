"""medcnn: a reproducible, auditable pipeline for CNNs on medical images.

Each DVC stage is a module (``python -m pipeline.<stage>``); shared code lives in small
modules named for what they hold. See README.md and dvc.yaml for the stage graph.

Importing the package pins the CPU kernels numpy and torch will choose
(:mod:`pipeline.core.kernels`): it must happen before either loads, which is why it is here,
the one import every entry point runs first.
"""

from pipeline.core import kernels as _kernels

_kernels.pin()

__version__ = "0.1.0"
