"""Data-parallel training with PyTorch's own engines: ``torch.distributed.run`` and DDP.

``train.processes: N`` (N > 1) makes the train stage start N workers with
``python -m torch.distributed.run --standalone --nproc-per-node N`` (torchrun), gloo on CPU and
NCCL on CUDA; each worker joins the process group from the environment torchrun sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``…). Nothing here schedules or
communicates by itself: :class:`World` only says which share of each batch is this worker's
and wraps the two collectives the training loop needs.

How one batch is shared: every worker draws the epoch's order and the batch's augmentation
from the same seeded generator, so all agree on the global batch of ``train.batch_size``
images; worker r takes the r-th of N contiguous slices of it. Each worker's loss is the
weighted sum over its slice divided by the weight of the whole batch, times N, and DDP
averages the gradients over workers: the same gradient as one process computes on the whole
batch, up to the order of floating-point sums. A last batch smaller than N images is dropped
when N > 1 (nobody could take an empty slice).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.runtime import select_device


@dataclasses.dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device | None = None  # this worker's device under torchrun (None: train.device decides)

    @property
    def is_main(self) -> bool:
        """Only this process writes outputs and checkpoints."""
        return self.rank == 0

    def share(self, batch: np.ndarray) -> tuple[np.ndarray, slice]:
        """This worker's contiguous slice of a global batch, and where it sits in the batch."""
        bounds = np.linspace(0, len(batch), self.size + 1).round().astype(int)
        rows = slice(int(bounds[self.rank]), int(bounds[self.rank + 1]))
        return batch[rows], rows

    def total(self, value: float) -> float:
        """``value`` summed over workers."""
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)  # NCCL reduces GPU tensors only
        torch.distributed.all_reduce(tensor)
        return float(tensor.item())

    def gather(self, array: np.ndarray) -> np.ndarray:
        """Every worker's ``array`` (of any length), concatenated in rank order."""
        if self.size == 1:
            return array
        parts: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(parts, array)
        return np.concatenate(parts)


ALONE = World()  # one process, the default


def join(device: str) -> World:
    """The world torchrun started this process in (a world of one outside torchrun). On CUDA
    (``train.device`` cuda, or auto with a GPU) worker r uses GPU ``LOCAL_RANK`` (modulo the GPUs
    present) and NCCL; on the CPU, gloo."""
    if "LOCAL_RANK" not in os.environ:
        return ALONE
    chosen = select_device(device)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        torch.cuda.set_device(chosen)  # NCCL's collectives (and all_gather_object) use the current device
    torch.distributed.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return World(torch.distributed.get_rank(), torch.distributed.get_world_size(), chosen)


def leave(world: World) -> None:
    if world.size > 1:
        torch.distributed.destroy_process_group()


def launch(processes: int, module: str, params: Path) -> int:
    """Run ``python -m <module> --params <params>`` as ``processes`` workers under torchrun; its exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", module, "--params", str(params)]
    return subprocess.call(command)
