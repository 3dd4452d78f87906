"""The dataset on disk: ``data/prepared/{train,val,test}/*.npy`` plus ``meta.json``, and the
balanced training set the balance stage derives from it (``data/balanced/``).

Arrays are plain ``.npy`` (no pickle). Images (and masks) are read row by row through
:class:`ImageRows` (``pread`` at the row's offset), so no stage ever holds a split, let alone
a copy of it, in memory: a dataset larger than RAM trains, evaluates and explains in the
memory of a few batches. Reading through a memory map would not do: every page a map has
touched counts in the process's resident memory until the kernel evicts it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.files import load_npy, read_json, save_npy, write_json

SPLITS = ("train", "val", "test")
# masks: lesion masks where ground truth exists; groups: a subgroup column (e.g. site);
# patients: pseudonymised patient ids; markers: phantom shortcut marker present (0/1).
# All optional but images, labels and ids.
ARRAYS = ("images", "labels", "ids", "masks", "groups", "patients", "markers")
META = "meta.json"
# data/balanced/: training rows to use, SMOTE's synthetic images and labels, loss weights per class.
INDICES, SYNTHETIC_IMAGES, SYNTHETIC_LABELS, CLASS_WEIGHTS = BALANCED_FILES = (
    "indices.npy", "synthetic_images.npy", "synthetic_labels.npy", "class_weights.json")


def array_path(root: str | Path, split: str, name: str) -> Path:
    """Where one array of one split lives: ``root/<split>/<name>.npy``."""
    return Path(root) / split / f"{name}.npy"


def marker_region(box: tuple[int, int, int, int], shape: tuple[int, ...]) -> np.ndarray:
    """The voxels of meta's ``marker_box`` (top, bottom, left, right: the phantom's shortcut
    marker) as a boolean array of the spatial ``shape``; in a volume the box spans ``top:bottom``
    in depth as well, a cube."""
    top, bottom, left, right = box
    region = np.zeros(shape, dtype=bool)
    region[(slice(top, bottom),) * (len(shape) - 1) + (slice(left, right),)] = True
    return region


class ImageRows:
    """The rows of an N×… ``.npy`` file, read from disk on demand, like a read-only array.

    ``rows[i]``, ``rows[a:b]`` and ``rows[[i, j, …]]`` return arrays holding just those rows;
    ``len(rows)``, ``rows.shape`` and ``rows.dtype`` describe the whole; ``np.asarray(rows)``
    reads everything (for small arrays only). The file is opened lazily in each process, so a
    DataLoader worker forked from this one reads with its own descriptor.
    """

    def __init__(self, path: str | Path) -> None:
        self.path, self._fd, self._pid = Path(path), None, -1
        with open(self.path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(handle)
            self.offset = handle.tell()
        if fortran or not shape:
            raise PipelineError(f"{self.path}: expected a C-ordered array of rows")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self._read(self._position(int(key)), 1)[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return self._read(start, max(stop - start, 0))
            key = np.arange(start, stop, step)
        index = np.asarray(key, dtype=np.int64)
        out = np.empty((len(index), *self.shape[1:]), dtype=self.dtype)
        order = np.argsort(index, kind="stable")  # read in file order, hand back in the order asked
        for position in order:
            out[position] = self._read(self._position(int(index[position])), 1)[0]
        return out

    def __iter__(self) -> Iterator[np.ndarray]:
        for start in range(0, len(self), 1024):
            yield from self._read(start, min(1024, len(self) - start))

    def _position(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        return index % len(self)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        rows = self._read(0, len(self))
        return rows if dtype is None else rows.astype(dtype)

    def _read(self, start: int, count: int) -> np.ndarray:
        if self._pid != os.getpid():  # first use here, or in a forked worker
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        out = np.empty((count, *self.shape[1:]), dtype=self.dtype)
        if count and os.preadv(self._fd, [memoryview(out).cast("B")], self.offset + start * self.row_bytes) != out.nbytes:
            raise PipelineError(f"{self.path}: truncated (rows {start}..{start + count - 1} cannot be read)")
        return out

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)

    def __getstate__(self) -> dict[str, Any]:  # a spawned worker opens its own descriptor
        return {**self.__dict__, "_fd": None, "_pid": -1}


class StackedRows:
    """Several row readers of one row shape (the train and val splits' images) read as one, the
    first's rows first; indexed like :class:`ImageRows`."""

    def __init__(self, parts: Sequence[ImageRows]) -> None:
        self.parts = list(parts)
        self.offsets = np.cumsum([0, *[len(p) for p in self.parts]])
        self.shape, self.dtype = (int(self.offsets[-1]), *self.parts[0].shape[1:]), self.parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        index = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key, dtype=np.int64)
        if ((index < 0) | (index >= len(self))).any():
            raise IndexError(f"rows outside 0..{len(self) - 1}")
        out = np.empty((len(index), *self.shape[1:]), dtype=self.dtype)
        part = np.searchsorted(self.offsets, index, side="right") - 1
        for p, reader in enumerate(self.parts):
            mine = part == p
            if mine.any():
                out[mine] = reader[index[mine] - self.offsets[p]]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        rows = self[:]
        return rows if dtype is None else rows.astype(dtype)


LARGE = ("images", "masks")  # arrays read row by row; the other columns are small and loaded


def load_split(root: str | Path, split: str) -> dict[str, Any]:
    """One split: images and masks as :class:`ImageRows`, labels, ids, groups, patients and markers as arrays."""
    if not array_path(root, split, "images").is_file():
        raise PipelineError(f"{Path(root) / split}: prepared split not found (run the prepare stage first)")
    return {name: ImageRows(array_path(root, split, name)) if name in LARGE else load_npy(array_path(root, split, name))
            for name in ARRAYS if array_path(root, split, name).is_file()}


def save_meta(root: Path, meta: dict[str, Any]) -> None:
    write_json(root / META, meta)


def load_meta(root: str | Path) -> dict[str, Any]:
    path = Path(root) / META
    if not path.is_file():
        raise PipelineError(f"{path}: not found (run the prepare stage first)")
    return read_json(path)


@dataclasses.dataclass
class TrainingSet:
    """The balanced training set, read by position: the prepared training rows the balance stage
    chose (repeated or dropped), then SMOTE's synthetic images (the one extra array in memory)."""

    rows: ImageRows
    indices: np.ndarray  # prepared training row of each position before the synthetic ones
    synthetic: np.ndarray
    labels: np.ndarray  # of every position
    weights: list[float]  # loss weight per class

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.rows.shape[1:])

    def __getitem__(self, key: slice | Sequence[int] | np.ndarray) -> np.ndarray:
        positions = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key, dtype=np.int64)
        out = np.empty((len(positions), *self.rows.shape[1:]), dtype=np.uint8)
        real = positions < len(self.indices)
        out[real] = self.rows[self.indices[positions[real]]]
        out[~real] = self.synthetic[positions[~real] - len(self.indices)]
        return out


def load_training_set(prepared: Path, balanced: Path) -> TrainingSet:
    """The balance stage's training set over the prepared training split, nothing read yet."""
    if not (balanced / INDICES).is_file():
        raise PipelineError(f"{balanced}: balanced training set not found (run the balance stage first)")
    train = load_split(prepared, "train")
    indices = load_npy(balanced / INDICES)
    labels = np.concatenate([train["labels"][indices], load_npy(balanced / SYNTHETIC_LABELS)])
    return TrainingSet(train["images"], indices, load_npy(balanced / SYNTHETIC_IMAGES), labels,
                       read_json(balanced / CLASS_WEIGHTS))


def save_balanced(folder: Path, indices: np.ndarray, synthetic: np.ndarray, synthetic_labels: np.ndarray,
                  weights: list[float]) -> None:
    save_npy(folder / INDICES, indices)
    save_npy(folder / SYNTHETIC_IMAGES, synthetic)
    save_npy(folder / SYNTHETIC_LABELS, synthetic_labels)
    write_json(folder / CLASS_WEIGHTS, weights)
