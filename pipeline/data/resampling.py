"""Class-imbalance strategies for the training split, one entry per ``balance.strategy``.

Each strategy returns the training rows to use (indices into the prepared training split,
repeated or dropped), synthetic images with their labels (SMOTE only), and the loss weight
of each class. imblearn samplers accept only 2-D inputs, so random over/undersampling
resample sample *indices* (``fit_resample(idx.reshape(-1, 1), y)``) instead of 4-D images;
SMOTE works on flattened pixels and blends images, which the report states.

Multi-label data (one 0/1 column per finding) take ``none`` or ``class_weight`` only: the
resamplers repeat, drop or blend whole images by their one class, and a multi-label image has
several findings at once (repeating images with a rare finding repeats the common findings
beside it). Their imbalance is met per finding instead: positive weights in the loss
(``class_weight``) and the label-aware ``train.sampler: weighted``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.files import rounded
from pipeline.data.labels import is_matrix

Resampled = tuple[np.ndarray, np.ndarray, np.ndarray]  # indices, synthetic images, synthetic labels


def _keep_all(images: np.ndarray, labels: np.ndarray, seed: int, k_neighbors: int) -> Resampled:
    return np.arange(len(labels)), *_no_synthetic(images)


def _random_sampler(name: str) -> Callable[[np.ndarray, np.ndarray, int, int], Resampled]:
    def resample(images: np.ndarray, labels: np.ndarray, seed: int, k_neighbors: int) -> Resampled:
        from imblearn.over_sampling import RandomOverSampler
        from imblearn.under_sampling import RandomUnderSampler

        sampler = (RandomOverSampler if name == "oversample" else RandomUnderSampler)(random_state=seed)
        sampler.fit_resample(np.arange(len(labels)).reshape(-1, 1), labels)
        return np.asarray(sampler.sample_indices_, dtype=np.int64), *_no_synthetic(images)
    return resample


def _smote(images: np.ndarray, labels: np.ndarray, seed: int, k_neighbors: int) -> Resampled:
    from imblearn.over_sampling import SMOTE

    smallest = int(np.bincount(labels).min())
    if smallest < 2:
        raise PipelineError(f"balance.strategy=smote needs at least 2 images per class; the smallest class has {smallest}")
    flat = np.asarray(images).reshape(len(images), -1).astype(np.float32)  # SMOTE works on every training image
    sampler = SMOTE(random_state=seed, k_neighbors=min(k_neighbors, smallest - 1))
    new_flat, new_labels = sampler.fit_resample(flat, labels)
    # fit_resample returns the originals first, then the synthetic rows.
    synthetic = np.clip(np.rint(new_flat[len(labels):]), 0, 255).astype(np.uint8)
    return np.arange(len(labels)), synthetic.reshape(-1, *images.shape[1:]), np.asarray(new_labels[len(labels):], np.int64)


def _no_synthetic(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, *images.shape[1:]), np.uint8), np.zeros(0, np.int64)


STRATEGIES: dict[str, Callable[[np.ndarray, np.ndarray, int, int], Resampled]] = {
    "none": _keep_all,
    "class_weight": _keep_all,  # every row once; the loss weights do the balancing
    "oversample": _random_sampler("oversample"),
    "undersample": _random_sampler("undersample"),
    "smote": _smote,
}


def resample(strategy: str, images: np.ndarray, labels: np.ndarray, seed: int, k_neighbors: int) -> Resampled:
    """Training indices, synthetic images and synthetic labels for ``strategy``."""
    if is_matrix(labels):
        if strategy not in ("none", "class_weight"):
            raise PipelineError(f"balance.strategy={strategy} cannot balance multi-label data: it resamples whole "
                                "images by one class, and these images have several findings each; use class_weight "
                                "(positive weights per finding) or train.sampler: weighted")
        indices, synthetic, _ = _keep_all(images, labels[:, 0], seed, k_neighbors)
        return indices, synthetic, np.zeros((0, labels.shape[1]), dtype=np.int64)
    return STRATEGIES[strategy](images, labels, seed, k_neighbors)


def class_weights(strategy: str, labels: np.ndarray, num_classes: int) -> list[float]:
    """'balanced' weights n / (K · n_k) for ``class_weight``; ones otherwise. Multi-label data:
    each finding's positive weight, absent / present among the images where it was assessed
    (``BCEWithLogitsLoss``'s ``pos_weight``: a finding in 1 image of 10 counts 9 times)."""
    if strategy != "class_weight":
        return [1.0] * num_classes
    if is_matrix(labels):
        return [rounded(float((labels[:, c] == 0).sum() / (labels[:, c] == 1).sum())) for c in range(num_classes)]
    counts = np.bincount(labels, minlength=num_classes)
    return [rounded(float(len(labels) / (num_classes * c))) for c in counts]
