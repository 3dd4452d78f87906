"""Classical baselines on raw pixels, as the seed compared CNNs with SVMs and random forests.

Each is fitted on exactly the CNN's training set (the balance stage's rows and synthetic
images, with its class weights as sample weights) and scored on the same validation and
test images, so the comparison isolates the model. Pixels are scaled to [0, 1]; the linear
models and the SVM standardise them on the training set.

The SVM is fitted once and its decision values are turned into probabilities by a logistic
(Platt) fit on the validation split: the validation split is where every choice is made, and
this avoids ``SVC(probability=True)``'s five extra internal fits.
"""

from __future__ import annotations

import logging
import time

import numpy as np

log = logging.getLogger(__name__)


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def fit_predict(name: str, train_images: np.ndarray, train_labels: np.ndarray, sample_weight: np.ndarray,
                val_images: np.ndarray, val_labels: np.ndarray, test_images: np.ndarray, seed: int,
                threads: int) -> tuple[dict[str, np.ndarray], float]:
    """Probabilities for the validation and test images, and the fit time in seconds."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    start = time.perf_counter()
    x_train, x_val, x_test = _flat(train_images), _flat(val_images), _flat(test_images)
    if name == "random_forest":
        model = RandomForestClassifier(n_estimators=100, min_samples_leaf=2, n_jobs=threads, random_state=seed)
        model.fit(x_train, train_labels, sample_weight=sample_weight)
        # Parallel prediction adds the trees' probabilities in thread order, so the last digits
        # vary from run to run; one job keeps the same bytes for the same seed.
        model.set_params(n_jobs=1)
        probs = {"val": model.predict_proba(x_val), "test": model.predict_proba(x_test)}
    else:
        scaler = StandardScaler().fit(x_train)
        x_train, x_val, x_test = scaler.transform(x_train), scaler.transform(x_val), scaler.transform(x_test)
        if name == "logistic_regression":
            model = LogisticRegression(C=0.01, max_iter=2000).fit(x_train, train_labels, sample_weight=sample_weight)
            probs = {"val": model.predict_proba(x_val), "test": model.predict_proba(x_test)}
        elif name == "svm":
            svm = SVC(C=1.0, random_state=seed).fit(x_train, train_labels, sample_weight=sample_weight)
            features = {split: _decision(svm, x) for split, x in (("val", x_val), ("test", x_test))}
            platt = LogisticRegression(max_iter=1000).fit(features["val"], val_labels)
            probs = {split: _all_classes(platt, f, svm.classes_) for split, f in features.items()}
        else:
            raise ValueError(f"unknown baseline {name!r}")
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
