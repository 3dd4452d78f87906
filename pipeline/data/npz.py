"""MedMNIST-format ``.npz`` files: ``{train,val,test}_images`` and ``{train,val,test}_labels``.

Every problem is one :class:`PipelineError` naming the file and the key: a zero-byte or
truncated file, a missing key, images and labels of different lengths, non-uint8 or NaN
pixels, non-integer labels, an empty split, splits of different shapes. Labels are one class
index per image (N or N×1) or, for multi-label data such as ChestMNIST, one 0/1 column per
finding (N×L, -1 where a finding was not assessed).
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from pipeline.core.dataset import SPLITS
from pipeline.core.errors import PipelineError

# What numpy and zipfile raise for a file that is not, or no longer, a whole .npz archive.
_UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def read_npz(path: str | Path, wanted: tuple[str, ...] = SPLITS) -> dict[str, dict[str, np.ndarray]]:
    """A MedMNIST-format ``.npz``: ``{split}_images`` and ``{split}_labels`` for each split
    (``wanted``: those splits only, as an external validation site may hold just ``test``).

    Images may be N×H×W (grayscale) or N×H×W×C with C in {1, 3}; volumes, as MedMNIST 3-D
    stores them, N×D×H×W (a 4-D array whose last axis is 4 or longer) or N×D×H×W×C; labels N
    or N×1 integers, or N×L for L findings (multi-label).
    """
    path = Path(path)
    with _open(path) as archive:
        expected = [f"{s}_{kind}" for s in wanted for kind in ("images", "labels")]
        missing = [key for key in expected if key not in archive.files]
        if missing:
            raise PipelineError(f"{path}: missing key '{missing[0]}' (has: {', '.join(archive.files) or 'nothing'})")
        splits = {}
        for split in wanted:
            images = _check_images(path, f"{split}_images", _member(path, archive, f"{split}_images"))
            labels = _check_labels(path, f"{split}_labels", _member(path, archive, f"{split}_labels"))
            if len(images) != len(labels):
                raise PipelineError(
                    f"{path}: {split}_images has {len(images)} images but {split}_labels has {len(labels)} labels"
                )
            if len(images) == 0:
                raise PipelineError(f"{path}: split '{split}' is empty")
            ids = np.array([f"{split}-{i:06d}" for i in range(len(images))])
            splits[split] = {"images": images, "labels": labels, "ids": ids}
    shapes = {s: splits[s]["images"].shape[1:] for s in wanted}
    if len(set(shapes.values())) != 1:
        raise PipelineError(f"{path}: splits have different image shapes {shapes}")
    return splits


def read_images(path: str | Path, key: str = "test_images") -> np.ndarray:
    """One image array of an ``.npz`` (N×H×W×C uint8), checked like :func:`read_npz` checks it."""
    path = Path(path)
    with _open(path) as archive:
        if key not in archive.files:
            raise PipelineError(f"{path}: missing key '{key}' (has: {', '.join(archive.files) or 'nothing'})")
        return _check_images(path, key, _member(path, archive, key))


def _open(path: Path) -> np.lib.npyio.NpzFile:
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise PipelineError(f"{path}: empty file (0 bytes), not a .npz archive")
    try:
        return np.load(path, allow_pickle=False)
    except _UNREADABLE as exc:
        raise PipelineError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None


def _member(path: Path, archive: np.lib.npyio.NpzFile, key: str) -> np.ndarray:
    """One array of the archive; a truncated or corrupt member is the file's error, not a traceback."""
    try:
        return archive[key]
    except _UNREADABLE as exc:
        raise PipelineError(f"{path}: {key} cannot be read, the file is truncated or corrupt "
                            f"({type(exc).__name__}: {exc})") from None


def _check_images(path: Path, key: str, images: np.ndarray) -> np.ndarray:
    if images.dtype.kind == "f" and np.isnan(images).any():
        raise PipelineError(f"{path}: {key} contains NaN values")
    if images.dtype != np.uint8:
        raise PipelineError(f"{path}: {key} has dtype {images.dtype}; expected uint8 pixel values 0..255")
    if images.ndim == 3 or images.ndim == 4 and images.shape[-1] >= 4:
        images = images[..., None]  # grayscale images, or volumes (MedMNIST 3-D: N×28×28×28)
    if images.ndim not in (4, 5) or images.shape[-1] not in (1, 3):
        raise PipelineError(f"{path}: {key} has shape {images.shape}; expected N×H×W, N×H×W×C with C in (1, 3), "
                            "or volumes N×D×H×W(×C)")
    return images


def _check_labels(path: Path, key: str, labels: np.ndarray) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim not in (1, 2):
        raise PipelineError(f"{path}: {key} has shape {labels.shape}; expected N class indices or an N×L "
                            "matrix of findings (multi-label)")
    if labels.dtype.kind == "f":
        if np.isnan(labels).any():
            raise PipelineError(f"{path}: {key} contains NaN values")
        if not np.all(labels == np.round(labels)):
            raise PipelineError(f"{path}: {key} has non-integer values; expected class indices")
    elif labels.dtype.kind not in "iu":
        raise PipelineError(f"{path}: {key} has dtype {labels.dtype}; expected integer class indices")
    return labels.astype(np.int64)
