"""Stage 2, balance: handle class imbalance on the training split only.

Writes ``data/balanced/``:
- ``indices.npy``: training-set rows to train on, in order (resampled for over/undersampling),
- ``synthetic_images.npy``/``synthetic_labels.npy``: SMOTE's synthetic images (empty otherwise),
- ``class_weights.json``: loss weights per class (all 1 unless ``class_weight``),
and ``reports/balance.json`` with before/after counts. Validation and test are never touched.

imblearn samplers accept only 2-D inputs, so random over/undersampling resample sample
*indices* (``fit_resample(idx.reshape(-1, 1), y)``) instead of 4-D images. SMOTE works on
flattened pixels and blends images: it creates synthetic images, which the report states.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import paths
from pipeline.errors import PipelineError
from pipeline.files import save_npy, staged_dir, write_json
from pipeline.params import Params
from pipeline.runtime import stage_main
from pipeline.splits import load_meta, load_split

log = logging.getLogger(__name__)


def resample(strategy: str, images: np.ndarray, labels: np.ndarray, seed: int, k_neighbors: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training indices, synthetic images and synthetic labels for ``strategy``."""
    indices = np.arange(len(labels))
    no_synthetic = (np.zeros((0, *images.shape[1:]), np.uint8), np.zeros(0, np.int64))
    if strategy in ("none", "class_weight"):
        return (indices, *no_synthetic)
    if strategy in ("oversample", "undersample"):
        from imblearn.under_sampling import RandomUnderSampler
        from imblearn.over_sampling import RandomOverSampler

        sampler_cls = RandomOverSampler if strategy == "oversample" else RandomUnderSampler
        sampler = sampler_cls(random_state=seed)
        sampler.fit_resample(indices.reshape(-1, 1), labels)
        return (np.asarray(sampler.sample_indices_, dtype=np.int64), *no_synthetic)
    if strategy == "smote":
        from imblearn.over_sampling import SMOTE

        smallest = int(np.bincount(labels).min())
        if smallest < 2:
            raise PipelineError(f"balance.strategy=smote needs at least 2 images per class; the smallest class has {smallest}")
        flat = images.reshape(len(images), -1).astype(np.float32)
        sampler = SMOTE(random_state=seed, k_neighbors=min(k_neighbors, smallest - 1))
        new_flat, new_labels = sampler.fit_resample(flat, labels)
        # fit_resample returns the originals first, then the synthetic rows.
        synthetic = np.clip(np.rint(new_flat[len(labels):]), 0, 255).astype(np.uint8)
        return indices, synthetic.reshape(-1, *images.shape[1:]), np.asarray(new_labels[len(labels):], np.int64)
    raise PipelineError(f"unknown balance.strategy '{strategy}'")


def class_weights(strategy: str, labels: np.ndarray, num_classes: int) -> list[float]:
    """'balanced' weights n / (K · n_k) for ``class_weight``; ones otherwise."""
    if strategy != "class_weight":
        return [1.0] * num_classes
    counts = np.bincount(labels, minlength=num_classes)
    return [round(float(len(labels) / (num_classes * c)), 6) for c in counts]


def run(params: Params, prepared: Path = paths.PREPARED, out_dir: Path = paths.BALANCED,
        report_path: Path = paths.BALANCE_REPORT) -> dict[str, Any]:
    meta = load_meta(prepared)
    train = load_split(prepared, "train")
    labels = train["labels"]
    strategy = params.balance.strategy
    indices, synthetic, synthetic_labels = resample(strategy, train["images"], labels, params.seed,
                                                    params.balance.smote_k_neighbors)
    weights = class_weights(strategy, labels, meta["num_classes"])
    names = meta["class_names"]
    after = np.bincount(np.concatenate([labels[indices], synthetic_labels]), minlength=len(names))
    report = {
        "strategy": strategy,
        "before": {n: int(c) for n, c in zip(names, np.bincount(labels, minlength=len(names)))},
        "after": {n: int(c) for n, c in zip(names, after)},
        "class_weights": dict(zip(names, weights)),
        "synthetic_images": int(len(synthetic_labels)),
        "n_before": int(len(labels)),
        "n_after": int(after.sum()),
    }
    with staged_dir(out_dir) as tmp:
        save_npy(tmp / "indices.npy", indices)
        save_npy(tmp / "synthetic_images.npy", synthetic)
        save_npy(tmp / "synthetic_labels.npy", synthetic_labels)
        write_json(tmp / "class_weights.json", weights)
    write_json(report_path, report)
    log.info("balance=%s: %s -> %s", strategy, report["before"], report["after"])
    return report


def main() -> None:
    stage_main(__doc__.splitlines()[0], run)


if __name__ == "__main__":
    main()
