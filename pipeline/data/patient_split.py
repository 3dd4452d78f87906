"""Patient-grouped, label-stratified train/val/test assignment.

No patient appears in two splits: images are grouped by (pseudonymised) patient id, or each
image is its own group when ids are unknown. ``StratifiedGroupKFold`` keeps class
proportions close to equal across splits; one fold of ``round(1/test)`` becomes the test
split, then one fold of the rest becomes validation. Seeded, so the assignment is the same
for the same data, params and seed.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.dataset import LARGE, StackedRows, load_split
from pipeline.core.errors import PipelineError
from pipeline.data.labels import strata

DEVELOPMENT = ("train", "val")  # the splits cross-validation folds


def assign(labels: np.ndarray, groups: np.ndarray, val: float, test: float, seed: int) -> np.ndarray:
    """An array of 'train'/'val'/'test', one per image."""
    splits = np.full(len(labels), "train", dtype=object)
    test_idx = _one_fold(np.arange(len(labels)), labels, groups, test, seed)
    splits[test_idx] = "test"
    rest = np.flatnonzero(splits == "train")
    val_idx = _one_fold(rest, labels[rest], groups[rest], val / (1 - test), seed + 1)
    splits[rest[val_idx]] = "val"
    return splits.astype(str)


def _one_fold(index: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    from sklearn.model_selection import StratifiedGroupKFold  # ~150 MB: only sources that need splitting pay

    n_groups = len(np.unique(groups))
    folds = min(max(2, round(1 / fraction)), n_groups)
    if n_groups < 2:
        raise PipelineError(f"cannot split {len(index)} images of {n_groups} patient(s) into train/val/test")
    _, counts = np.unique(labels, return_counts=True)
    if (counts < folds).all():
        # Too few images in every class to stratify (StratifiedGroupKFold refuses): a seeded
        # fold of whole patients, so no patient is ever split.
        names = np.unique(groups)
        np.random.default_rng(seed).shuffle(names)
        return np.flatnonzero(np.isin(groups, names[:max(1, round(len(names) / folds))]))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed % 2**32)
    with warnings.catch_warnings():
        # A class with fewer members than folds only makes stratification approximate.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        _, held_out = next(splitter.split(np.zeros(len(index)), labels, groups))
    return held_out


def cv_folds(labels: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold numbers 1..k, one per image, for ``cv.folds``: whole patients per fold, class
    proportions kept close by ``StratifiedGroupKFold``, seeded. Every fold holds images of every
    class, or the error says which fold lacks one."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    if n_groups < k:
        raise PipelineError(f"cv.folds: {k} folds need at least {k} patients in train + val, found {n_groups}")
    folds = np.zeros(len(labels), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed % 2**32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for number, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups), start=1):
            folds[held_out] = number
    for number in range(1, k + 1):
        missing = sorted(set(np.unique(labels).tolist()) - set(np.unique(labels[folds == number]).tolist()))
        if missing:
            raise PipelineError(f"cv.folds: fold {number} of {k} holds no image of class(es) {missing}: too few "
                                f"patients of that class for {k} folds (use fewer folds)")
    return folds


def overlap(patients: dict[str, np.ndarray]) -> list[str]:
    """Pseudonymised patient ids found in more than one split."""
    seen: dict[str, str] = {}
    shared = set()
    for split, ids in patients.items():
        for pid in np.unique(ids):
            if pid in seen and seen[pid] != split:
                shared.add(str(pid))
            seen.setdefault(pid, split)
    return sorted(shared)


def development(prepared: Path) -> dict[str, Any]:
    """The development images (train rows, then val rows) as one split: images and masks read
    from both splits' files (:class:`StackedRows`), the small arrays concatenated."""
    splits = [load_split(prepared, s) for s in DEVELOPMENT]
    names = set.intersection(*[set(s) for s in splits])
    return {name: StackedRows([s[name] for s in splits]) if name in LARGE else np.concatenate([s[name] for s in splits])
            for name in names}


def development_folds(prepared: Path, k: int, seed: int) -> tuple[dict[str, Any], np.ndarray]:
    """:func:`development` and each of its images' fold (1..k): whole patients per fold (each
    image its own patient where ids are unknown). Recomputed wherever folds are needed, never
    stored: the same prepared data, k and seed give the same folds."""
    dev = development(prepared)
    groups = dev["patients"] if "patients" in dev else dev["ids"]
    return dev, cv_folds(strata(dev["labels"]), groups, k, seed)
