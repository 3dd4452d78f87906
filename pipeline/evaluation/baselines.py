"""Classical baselines on raw pixels, as the seed compared CNNs with SVMs, decision trees and random forests.

Each is fitted on exactly the CNN's training set (the balance stage's rows and synthetic
images, with its class weights as sample weights) and scored on the same validation and
test images, so the comparison isolates the model. Pixels are scaled to [0, 1]; the linear
model and the SVM standardise them on the training set. ``BASELINES`` has one entry per
name ``evaluate.baselines`` accepts.

The SVM is fitted once and its decision values are turned into probabilities by a logistic
(Platt) fit on the validation split: the validation split is where every choice is made, and
this avoids ``SVC(probability=True)``'s five extra internal fits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def _random_forest(x_train: np.ndarray, y: np.ndarray, w: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                   x_test: np.ndarray, seed: int, threads: int) -> dict[str, np.ndarray]:
    from sklearn.ensemble import RandomForestClassifier

    model = RandomForestClassifier(n_estimators=100, min_samples_leaf=2, n_jobs=threads, random_state=seed)
    model.fit(x_train, y, sample_weight=w)
    # Parallel prediction adds the trees' probabilities in thread order, so the last digits
    # vary from run to run; one job keeps the same bytes for the same seed.
    model.set_params(n_jobs=1)
    return {"val": model.predict_proba(x_val), "test": model.predict_proba(x_test)}


def _decision_tree(x_train: np.ndarray, y: np.ndarray, w: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                   x_test: np.ndarray, seed: int, threads: int) -> dict[str, np.ndarray]:
    from sklearn.tree import DecisionTreeClassifier

    # Depth and leaf size keep leaf probabilities from being all 0 or 1, so ROC AUC means something.
    model = DecisionTreeClassifier(max_depth=8, min_samples_leaf=5, random_state=seed).fit(x_train, y, sample_weight=w)
    return {"val": model.predict_proba(x_val), "test": model.predict_proba(x_test)}


def _standardised(fit: Callable[..., dict[str, np.ndarray]]) -> Callable[..., dict[str, np.ndarray]]:
    """``fit`` on pixels standardised with the training set's mean and standard deviation."""
    def wrapped(x_train: np.ndarray, y: np.ndarray, w: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                x_test: np.ndarray, seed: int, threads: int) -> dict[str, np.ndarray]:
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(x_train)
        return fit(scaler.transform(x_train), y, w, scaler.transform(x_val), y_val, scaler.transform(x_test), seed,
                   threads)
    return wrapped


@_standardised
def _logistic_regression(x_train: np.ndarray, y: np.ndarray, w: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                         x_test: np.ndarray, seed: int, threads: int) -> dict[str, np.ndarray]:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=0.01, max_iter=2000).fit(x_train, y, sample_weight=w)
    return {"val": model.predict_proba(x_val), "test": model.predict_proba(x_test)}


@_standardised
def _svm(x_train: np.ndarray, y: np.ndarray, w: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
         x_test: np.ndarray, seed: int, threads: int) -> dict[str, np.ndarray]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    svm = SVC(C=1.0, random_state=seed).fit(x_train, y, sample_weight=w)
    features = {split: _decision(svm, x) for split, x in (("val", x_val), ("test", x_test))}
    platt = LogisticRegression(max_iter=1000).fit(features["val"], y_val)
    return {split: _all_classes(platt, f, svm.classes_) for split, f in features.items()}


BASELINES: dict[str, Callable[..., dict[str, np.ndarray]]] = {
    "logistic_regression": _logistic_regression,
    "random_forest": _random_forest,
    "svm": _svm,
    "decision_tree": _decision_tree,
}


def fit_predict(name: str, train_images: np.ndarray, train_labels: np.ndarray, sample_weight: np.ndarray,
                val_images: np.ndarray, val_labels: np.ndarray, test_images: np.ndarray, seed: int,
                threads: int) -> tuple[dict[str, np.ndarray], float]:
    """Probabilities for the validation and test images, and the fit time in seconds."""
    start = time.perf_counter()
    probs = BASELINES[name](_flat(train_images), train_labels, sample_weight, _flat(val_images), val_labels,
                            _flat(test_images), seed, threads)
    seconds = time.perf_counter() - start
    log.info("baseline %s: %.1f s", name, seconds)
    return probs, seconds


def _decision(svm: "SVC", x: np.ndarray) -> np.ndarray:  # noqa: F821 - sklearn imported lazily
    values = svm.decision_function(x)
    return values.reshape(-1, 1) if values.ndim == 1 else values


def _all_classes(platt: "LogisticRegression", features: np.ndarray, classes: np.ndarray) -> np.ndarray:  # noqa: F821
    """Platt probabilities with a column for every class, even one absent from validation."""
    probs = np.zeros((len(features), len(classes)))
    probs[:, np.searchsorted(classes, platt.classes_)] = platt.predict_proba(features)
    return probs
