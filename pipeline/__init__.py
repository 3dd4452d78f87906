"""medcnn: a reproducible, auditable pipeline for CNNs on medical images.

Each DVC stage is a module (``python -m pipeline.<stage>``); shared code lives in small
modules named for what they hold. See README.md and dvc.yaml for the stage graph.
"""

__version__ = "0.1.0"
