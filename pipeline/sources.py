"""Readers of raw inputs. Each returns validated splits or raises one clear PipelineError.

A split is a dict with ``images`` (N×H×W×C uint8), ``labels`` (N int64) and ``ids`` (N str),
plus ``masks`` (N×H×W uint8) where ground-truth localisation exists.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from pipeline import catalog
from pipeline.errors import PipelineError
from pipeline.splits import SPLITS

log = logging.getLogger(__name__)



def read_npz(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """A MedMNIST-format ``.npz``: ``{split}_images`` and ``{split}_labels`` for each split.

    Images may be N×H×W (grayscale) or N×H×W×C with C in {1, 3}; labels N or N×1 integers.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise PipelineError(f"{path}: not a readable .npz file ({exc})") from None
    with archive:
        expected = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels")]
        missing = [key for key in expected if key not in archive.files]
        if missing:
            raise PipelineError(f"{path}: missing key '{missing[0]}' (has: {', '.join(archive.files) or 'nothing'})")
        splits = {}
        for split in SPLITS:
            images = _check_images(path, f"{split}_images", archive[f"{split}_images"])
            labels = _check_labels(path, f"{split}_labels", archive[f"{split}_labels"])
            if len(images) != len(labels):
                raise PipelineError(
                    f"{path}: {split}_images has {len(images)} images but {split}_labels has {len(labels)} labels"
                )
            if len(images) == 0:
                raise PipelineError(f"{path}: split '{split}' is empty")
            ids = np.array([f"{split}-{i:06d}" for i in range(len(images))])
            splits[split] = {"images": images, "labels": labels, "ids": ids}
    shapes = {s: splits[s]["images"].shape[1:] for s in SPLITS}
    if len(set(shapes.values())) != 1:
        raise PipelineError(f"{path}: splits have different image shapes {shapes}")
    return splits


def md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_medmnist(name: str, size: int, raw_dir: Path, url_template: str = catalog.MEDMNIST_URL) -> Path:
    """The official MedMNIST file in ``raw_dir``: downloaded once, MD5-verified every time.

    A file already there with a wrong MD5 is an error (it is never deleted: it may be the
    user's); a download is written to a temporary name and kept only if its MD5 matches.
    """
    entry = catalog.medmnist(name)
    if entry is None:
        raise PipelineError(f"unknown MedMNIST dataset '{name}' (known: {', '.join(catalog.MEDMNIST_NAMES)})")
    expected = entry["md5"][size]
    target = raw_dir / catalog.medmnist_file(name, size)
    if target.exists():
        found = md5_file(target)
        if found != expected:
            raise PipelineError(f"{target}: MD5 {found} does not match the official {expected}; "
                                "the file is corrupt or not the official release (move it away to download again)")
        return target
    url = url_template.format(file=target.name)
    raw_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=raw_dir)
    try:
        log.info("downloading %s", url)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out, 1 << 20)
        found = md5_file(Path(tmp))
        if found != expected:
            raise PipelineError(f"{url}: downloaded file has MD5 {found}, not the official {expected}; not kept")
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError) as exc:
        raise PipelineError(f"could not download {url} ({getattr(exc, 'reason', exc)}). Without network access, "
                            f"download {target.name} elsewhere and place it at {target} (MD5 {expected})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def check_classes(splits: dict[str, dict[str, np.ndarray]], class_names: tuple[str, ...], source: str) -> list[str]:
    """Check labels against the class list and return the class names.

    With ``class_names`` given, K is its length and every label must lie in 0..K-1. Without,
    K is the largest label + 1 and names are "0".."K-1". Either way every class must occur in
    the training split and there must be at least two classes.
    """
    largest = max(int(s["labels"].max()) for s in splits.values())
    k = len(class_names) if class_names else largest + 1
    for split, data in splits.items():
        bad = np.flatnonzero((data["labels"] < 0) | (data["labels"] >= k))
        if bad.size:
            raise PipelineError(
                f"{source}: {split} labels outside 0..{k - 1}: {bad.size} samples "
                f"(first at index {bad[0]}, label {data['labels'][bad[0]]})"
            )
    if k < 2:
        raise PipelineError(f"{source}: found {k} class; at least 2 are needed")
    absent = sorted(set(range(k)) - set(np.unique(splits["train"]["labels"]).tolist()))
    if absent:
        raise PipelineError(f"{source}: class(es) {absent} have no training images")
    return list(class_names) if class_names else [str(i) for i in range(k)]


def _check_images(path: Path, key: str, images: np.ndarray) -> np.ndarray:
    if images.dtype.kind == "f" and np.isnan(images).any():
        raise PipelineError(f"{path}: {key} contains NaN values")
    if images.dtype != np.uint8:
        raise PipelineError(f"{path}: {key} has dtype {images.dtype}; expected uint8 pixel values 0..255")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise PipelineError(f"{path}: {key} has shape {images.shape}; expected N×H×W or N×H×W×C with C in (1, 3)")
    return images


def _check_labels(path: Path, key: str, labels: np.ndarray) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise PipelineError(f"{path}: {key} has shape {labels.shape}; expected one label per image (multi-label is not supported)")
    if labels.dtype.kind == "f":
        if np.isnan(labels).any():
            raise PipelineError(f"{path}: {key} contains NaN values")
        if not np.all(labels == np.round(labels)):
            raise PipelineError(f"{path}: {key} has non-integer values; expected class indices")
    elif labels.dtype.kind not in "iu":
        raise PipelineError(f"{path}: {key} has dtype {labels.dtype}; expected integer class indices")
    return labels.astype(np.int64)
