"""Calibration: expected calibration error, reliability data, slope/intercept, temperature scaling.

Binary tasks are judged on P(positive class) against the observed positive rate; multi-class
tasks on the top-label confidence against accuracy. Temperature scaling divides the logits
(here the log-probabilities, equivalent up to a constant) by one scalar T fitted on the
validation split by minimising the negative log-likelihood; it never changes the ranking, so
AUC is unchanged, but it can make probabilities honest.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_softmax, softmax

from pipeline.core.files import rounded

N_BINS = 15


def confidence_and_outcome(labels: np.ndarray, probs: np.ndarray, positive_class: int = 1) -> tuple[np.ndarray, np.ndarray]:
    if probs.shape[1] == 2:
        return probs[:, positive_class], (labels == positive_class).astype(float)
    return probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(float)


def reliability(labels: np.ndarray, probs: np.ndarray, positive_class: int = 1,
                n_bins: int = N_BINS) -> list[dict[str, float | int]]:
    """Per equal-width bin: mean predicted probability, observed frequency, count."""
    conf, outcome = confidence_and_outcome(labels, probs, positive_class)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    rows = []
    for b in range(n_bins):
        inside = bins == b
        if inside.any():
            rows.append({"bin": b, "predicted": rounded(float(conf[inside].mean())),
                         "observed": rounded(float(outcome[inside].mean())), "count": int(inside.sum())})
    return rows


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, positive_class: int = 1,
                               n_bins: int = N_BINS) -> float:
    """Count-weighted mean |observed - predicted| over equal-width bins (15 by default)."""
    rows = reliability(labels, probs, positive_class, n_bins)
    total = sum(r["count"] for r in rows)
    return rounded(sum(r["count"] * abs(r["observed"] - r["predicted"]) for r in rows) / total)


def slope_intercept(labels: np.ndarray, probs: np.ndarray, positive_class: int = 1) -> tuple[float | None, float | None]:
    """Logistic recalibration: outcome ~ intercept + slope · logit(p). Perfect: slope 1, intercept 0.

    A slope below 1 means over-confident predictions (too extreme), above 1 under-confident.
    The unpenalised maximum-likelihood fit by Newton's method (a 2×2 system per step), fast
    enough to repeat for every bootstrap resample; None when it does not exist (one outcome
    only, or outcomes separated perfectly by the score).
    """
    conf, outcome = confidence_and_outcome(labels, probs, positive_class)
    if outcome.min() == outcome.max():
        return None, None
    p = np.clip(conf, 1e-6, 1 - 1e-6)
    design = np.column_stack([np.ones_like(p), np.log(p / (1 - p))])
    coef = np.zeros(2)
    for _ in range(100):
        fitted = expit(design @ coef)
        hessian = (design * (fitted * (1 - fitted))[:, None]).T @ design
        if np.linalg.cond(hessian) > 1e12:
            return None, None
        step = np.linalg.solve(hessian, design.T @ (outcome - fitted))
        coef += step
        if np.abs(step).max() < 1e-10:
            return rounded(float(coef[1])), rounded(float(coef[0]))
    return None, None  # diverging: the outcomes are separated


def fit_temperature(labels: np.ndarray, probs: np.ndarray) -> float:
    """The T in [0.05, 20] that minimises validation negative log-likelihood of softmax(log p / T)."""
    logits = np.log(np.clip(probs, 1e-12, 1))

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=1)[np.arange(len(labels)), labels].mean())

    result = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded", options={"xatol": 1e-6})
    return rounded(float(np.exp(result.x)))


# ``evaluate.calibrate``: the temperature fitted on validation (labels, probabilities); 1 is none.
CALIBRATIONS = {
    "temperature": lambda labels, probs: fit_temperature(labels, probs),
    "none": lambda labels, probs: 1.0,
}


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    return softmax(np.log(np.clip(probs, 1e-12, 1)) / temperature, axis=1)


def summarise(labels: np.ndarray, probs: np.ndarray, positive_class: int = 1) -> dict[str, float | None]:
    slope, intercept = slope_intercept(labels, probs, positive_class)
    return {"ece": expected_calibration_error(labels, probs, positive_class), "slope": slope, "intercept": intercept}


def summarise_with_ci(labels: np.ndarray, probs: np.ndarray, positive_class: int, n_resamples: int, seed: int,
                      groups: np.ndarray | None = None) -> dict[str, float | None]:
    """:func:`summarise` with ``<key>_ci_low``/``_ci_high`` percentile bootstrap bounds (the headline
    metrics' resampling: whole patients when ``groups`` is given)."""
    from pipeline.evaluation.metrics import bootstrap_ci

    point = summarise(labels, probs, positive_class)
    intervals = bootstrap_ci(labels, probs, lambda y, p: summarise(y, p, positive_class), n_resamples, seed, groups)
    for key, (low, high) in intervals.items():
        point.update({f"{key}_ci_low": low, f"{key}_ci_high": high})
    return point
