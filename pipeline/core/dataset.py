"""The dataset on disk: ``data/prepared/{train,val,test}/*.npy`` plus ``meta.json``, and the
balanced training set the balance stage derives from it (``data/balanced/``).

Arrays are plain ``.npy`` (no pickle) so later stages can memory-map them.
"""

from __future__ import annotations

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
INDICES, SYNTHETIC_IMAGES, SYNTHETIC_LABELS, CLASS_WEIGHTS = (
    "indices.npy", "synthetic_images.npy", "synthetic_labels.npy", "class_weights.json")


def array_path(root: str | Path, split: str, name: str) -> Path:
    """Where one array of one split lives: ``root/<split>/<name>.npy``."""
    return Path(root) / split / f"{name}.npy"


def load_split(root: str | Path, split: str, mmap: bool = False) -> dict[str, np.ndarray]:
    if not array_path(root, split, "images").is_file():
        raise PipelineError(f"{Path(root) / split}: prepared split not found (run the prepare stage first)")
    return {name: load_npy(array_path(root, split, name), mmap=mmap) for name in ARRAYS
            if array_path(root, split, name).is_file()}


def save_meta(root: Path, meta: dict[str, Any]) -> None:
    write_json(root / META, meta)


def load_meta(root: str | Path) -> dict[str, Any]:
    path = Path(root) / META
    if not path.is_file():
        raise PipelineError(f"{path}: not found (run the prepare stage first)")
    return read_json(path)


def load_training_set(prepared: Path, balanced: Path) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """The balanced training images/labels (resampled rows + synthetic images) and class weights."""
    train = load_split(prepared, "train")
    if not (balanced / INDICES).is_file():
        raise PipelineError(f"{balanced}: balanced training set not found (run the balance stage first)")
    indices = load_npy(balanced / INDICES)
    images = np.concatenate([train["images"][indices], load_npy(balanced / SYNTHETIC_IMAGES)])
    labels = np.concatenate([train["labels"][indices], load_npy(balanced / SYNTHETIC_LABELS)])
    return images, labels, read_json(balanced / CLASS_WEIGHTS)


def save_balanced(folder: Path, indices: np.ndarray, synthetic: np.ndarray, synthetic_labels: np.ndarray,
                  weights: list[float]) -> None:
    save_npy(folder / INDICES, indices)
    save_npy(folder / SYNTHETIC_IMAGES, synthetic)
    save_npy(folder / SYNTHETIC_LABELS, synthetic_labels)
    write_json(folder / CLASS_WEIGHTS, weights)
