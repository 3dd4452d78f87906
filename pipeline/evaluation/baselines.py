"""Classical baselines on raw pixels, as the seed compared CNNs with SVMs, decision trees and random forests.

Each is fitted on exactly the CNN's training set (the balance stage's rows and synthetic
images, with its class weights as sample weights) and scored on the same validation and
test images, so the comparison isolates the model. Pixels are scaled to [0, 1]; the linear
model and the SVM standardise them on the training set. ``BASELINES`` has one entry per
name ``evaluate.baselines`` accepts: it fits on flattened pixels and returns a scorer. Above
``evaluate.baseline_max_train`` training images the baselines are fitted on a seeded,
stratified subsample of that size (their pixels must sit in memory as floats). Volumes are
average-pooled in blocks of k×k×k voxels first, with the smallest k that leaves at most
``VOXEL_FEATURES`` features (a 32³ volume becomes 16³, as many features as a 64² image):
tens of thousands of raw voxels per sample would cost the decision tree alone more time than
the CNN's evaluation, for a baseline that stays near chance either way.

The SVM is fitted once and its decision values are turned into probabilities by a logistic
(Platt) fit on the validation split: the validation split is where every choice is made, and
this avoids ``SVC(probability=True)``'s five extra internal fits.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


Scorer = Callable[[np.ndarray], np.ndarray]  # flattened pixels -> class probabilities (or SVM decision values)


VOXEL_FEATURES = 4096


def pooling(shape: tuple[int, ...]) -> int:
    """k of the k×k×k blocks a volume of ``shape`` (N×D×H×W×C) is averaged in; 1 for images."""
    if len(shape) != 5:
        return 1
    return max(1, math.ceil((math.prod(shape[1:4]) / VOXEL_FEATURES) ** (1 / 3) - 1e-9))


def _flat(images: np.ndarray) -> np.ndarray:
    k = pooling(images.shape)
    if k > 1:
        n, d, h, w, c = images.shape
        cropped = images[:, :d - d % k, :h - h % k, :w - w % k].astype(np.float32)
        images = cropped.reshape(n, d // k, k, h // k, k, w // k, k, c).mean(axis=(2, 4, 6))
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def _random_forest(x: np.ndarray, y: np.ndarray, w: np.ndarray, seed: int, threads: int) -> Scorer:
    from sklearn.ensemble import RandomForestClassifier

    model = RandomForestClassifier(n_estimators=100, min_samples_leaf=2, n_jobs=threads, random_state=seed)
    model.fit(x, y, sample_weight=w)
    # Parallel prediction adds the trees' probabilities in thread order, so the last digits
    # vary from run to run; one job keeps the same bytes for the same seed.
    model.set_params(n_jobs=1)
    return model.predict_proba


def _decision_tree(x: np.ndarray, y: np.ndarray, w: np.ndarray, seed: int, threads: int) -> Scorer:
    from sklearn.tree import DecisionTreeClassifier

    # Depth and leaf size keep leaf probabilities from being all 0 or 1, so ROC AUC means something.
    return DecisionTreeClassifier(max_depth=8, min_samples_leaf=5, random_state=seed).fit(x, y, sample_weight=w).predict_proba


def _standardised(fit: Callable[..., Scorer]) -> Callable[..., Scorer]:
    """``fit`` on pixels standardised with the training set's mean and standard deviation."""
    def wrapped(x: np.ndarray, y: np.ndarray, w: np.ndarray, seed: int, threads: int) -> Scorer:
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(x)
        scorer = fit(scaler.transform(x), y, w, seed, threads)
        return lambda rows: scorer(scaler.transform(rows))
    return wrapped


@_standardised
def _logistic_regression(x: np.ndarray, y: np.ndarray, w: np.ndarray, seed: int, threads: int) -> Scorer:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=0.01, max_iter=2000).fit(x, y, sample_weight=w).predict_proba


@_standardised
def _svm(x: np.ndarray, y: np.ndarray, w: np.ndarray, seed: int, threads: int) -> Scorer:
    from sklearn.svm import SVC

    svm = SVC(C=1.0, random_state=seed).fit(x, y, sample_weight=w)
    return lambda rows: _decision(svm, rows)


BASELINES: dict[str, Callable[..., Scorer]] = {
    "logistic_regression": _logistic_regression,
    "random_forest": _random_forest,
    "svm": _svm,
    "decision_tree": _decision_tree,
}
# The SVM scores decision values; a logistic (Platt) fit on validation makes them probabilities.
PLATT = ("svm",)


def subsample(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Positions of at most ``limit`` training images, stratified by label and seeded (all when fewer)."""
    if len(labels) <= limit:
        return np.arange(len(labels))
    from sklearn.model_selection import train_test_split

    picked, _ = train_test_split(np.arange(len(labels)), train_size=limit, stratify=labels, random_state=seed)
    return np.sort(picked)


def fit_predict(name: str, train_images: Any, train_labels: np.ndarray, sample_weight: np.ndarray, val_images: Any,
                val_labels: np.ndarray, test_images: Any, seed: int, threads: int, max_train: int,
                chunk: int = 2048) -> tuple[dict[str, np.ndarray], float]:
    """Probabilities for the validation and test images, and the time it took in seconds.

    Fitted on at most ``max_train`` training images (a seeded, stratified subsample: classical
    models need their training set in memory as float pixels); validation and test images are
    read and scored ``chunk`` at a time, so neither split is ever in memory whole.
    """
    start = time.perf_counter()
    rows = subsample(train_labels, max_train, seed)
    scorer = BASELINES[name](_flat(np.asarray(train_images[rows])), train_labels[rows], sample_weight[rows], seed,
                             threads)
    scores = {split: np.concatenate([scorer(_flat(np.asarray(images[i:i + chunk])))
                                     for i in range(0, len(images), chunk)])
              for split, images in (("val", val_images), ("test", test_images))}
    if name in PLATT:
        from sklearn.linear_model import LogisticRegression

        platt = LogisticRegression(max_iter=1000).fit(scores["val"], val_labels)
        classes = np.unique(train_labels[rows])
        scores = {split: _all_classes(platt, values, classes) for split, values in scores.items()}
    seconds = time.perf_counter() - start
    log.info("baseline %s: %.1f s", name, seconds)
    return scores, seconds


def _decision(svm: "SVC", x: np.ndarray) -> np.ndarray:  # noqa: F821 - sklearn imported lazily
    values = svm.decision_function(x)
    return values.reshape(-1, 1) if values.ndim == 1 else values


def _all_classes(platt: "LogisticRegression", features: np.ndarray, classes: np.ndarray) -> np.ndarray:  # noqa: F821
    """Platt probabilities with a column for every class, even one absent from validation."""
    probs = np.zeros((len(features), len(classes)))
    probs[:, np.searchsorted(classes, platt.classes_)] = platt.predict_proba(features)
    return probs
