"""Process-wide settings every stage shares: seeding, threads, device, logging, entry point."""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.core.config import load_params
from pipeline.core.errors import PipelineError

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed the global generators that third-party code may still use.

    Project code passes explicit ``numpy.random.Generator``/``torch.Generator`` objects; this
    only guards against libraries that draw from global state. torch is seeded only when the
    stage has imported it: importing it costs ~300 MB and seconds in stages that never use it.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)


# glibc's M_MMAP_THRESHOLD option of mallopt(3).
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024


def steady_heap() -> None:
    """Fix glibc's mmap threshold at 32 MiB. By default glibc raises the threshold each time it
    frees a large mapped buffer, so from then on buffers of that size (image batches,
    activations) move between mapped memory and the heap, whose freed holes it keeps: peak
    memory then creeps up with the number of training steps (one epoch of 100,000 128×128
    images: 1,061 MB by default, 857 MB with the threshold fixed). A low threshold, 64 KiB,
    frees more (512 vs 752 MB at 20,000 images) but maps and zero-fills every buffer afresh:
    35% slower. No-op outside glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def configure_torch(threads: int, deterministic: bool = True) -> None:
    """Fix the thread count (torch's, and numpy's and scikit-learn's BLAS and OpenMP pools), ask
    for deterministic kernels (same seed => same bytes), keep NNPACK out (its convolutions block
    their loops by the CPU's cache sizes; oneDNN is the pinned path, :mod:`pipeline.core.kernels`)
    and keep the heap steady (:func:`steady_heap`).

    The deterministic flag is set on the eager kernels directly: the public
    ``torch.use_deterministic_algorithms`` also sets torch.compile's flag, and importing the
    compiler for it (inductor, dynamo, sympy) costs 0.9 s and ~75 MB of resident memory for a
    compiler the pipeline never runs. Stages without an optimiser (evaluate, explain) are spared
    it; train pays it anyway, as ``torch.optim`` imports dynamo on first use.
    ``torch.are_deterministic_algorithms_enabled()`` reads the same flag either way.
    """
    import torch

    steady_heap()

    torch.set_num_threads(threads)
    torch._C._set_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.nnpack.set_flags(False)
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)


def select_device(name: str) -> "torch.device":  # noqa: F821 - torch imported lazily
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def device_name(device: "torch.device") -> str:  # noqa: F821 - torch imported lazily
    """``cpu``, or ``cuda`` with the GPU's name: what the report's reproducibility scope turns on."""
    import torch

    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type


def configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("MEDCNN_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )


def run_command(work: Callable[[], int | None]) -> None:
    """Run a command's work; a :class:`PipelineError` becomes one line on stderr and exit code 1
    (no traceback), and a returned non-zero code becomes the exit code."""
    try:
        code = work()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    if code:
        sys.exit(code)


def stage_main(description: str, run: Callable[..., object], item: tuple[str, type, str] | None = None) -> None:
    """Command-line entry point shared by every stage: ``--params``, logging, params, seeds, run.
    ``item`` (name, type, help): one positional argument passed to ``run`` after the params, the
    ``${item}`` of a DVC ``matrix`` stage (``python -m pipeline.fold 3``)."""
    parser = argparse.ArgumentParser(description=description)
    if item:
        parser.add_argument(item[0], type=item[1], help=item[2])
    parser.add_argument("--params", default="params.yaml", type=Path, help="params file (default: params.yaml)")
    args = parser.parse_args()
    configure_logging()

    def work() -> None:
        params = load_params(args.params)
        seed_everything(params.seed)
        run(params, *([getattr(args, item[0])] if item else []))

    run_command(work)
