"""Training batches streamed from disk through a ``torch.utils.data.DataLoader``.

The epoch's order (a seeded permutation or class-balanced draw, see
:func:`pipeline.modeling.recipe.epoch_order`) is drawn in the training process before the
epoch starts, and cut into batches; the loader then reads those batches, in that order, from
the prepared ``.npy`` files (:class:`pipeline.core.dataset.TrainingSet`). ``train.workers``
processes read ahead while the network trains; they only read and stack pixels, so every
random draw stays in the training process and the model's bytes do not depend on the number
of workers. Augmentation runs on the batch in the training process for the same reason.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from pipeline.core.dataset import TrainingSet


class _Batches(torch.utils.data.Dataset):
    """Item b: the b-th batch of positions of the order, as (uint8 N×C×H×W or N×C×D×H×W, labels)."""

    def __init__(self, data: TrainingSet, batches: list[np.ndarray]) -> None:
        self.data, self.batches = data, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = self.batches[index]
        images = np.ascontiguousarray(np.moveaxis(self.data[positions], -1, 1))
        return torch.from_numpy(images), torch.from_numpy(self.data.labels[positions])


def batches(data: TrainingSet, chunks: list[np.ndarray], workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images uint8 N×C×H×W, labels) for each array of positions in ``chunks``, in order."""
    # batch_size=None: the dataset's items are whole batches already.
    return iter(torch.utils.data.DataLoader(_Batches(data, chunks), batch_size=None, num_workers=workers,
                                            prefetch_factor=2 if workers else None))
