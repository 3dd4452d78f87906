"""Calibration: ECE by hand, slope/intercept, and temperature scaling fixing over-confidence."""

import numpy as np
import pytest

from pipeline.evaluation import calibration


def overconfident(n, seed):
    """True probability p, reported as a sharpened p^4 / (p^4 + (1-p)^4): over-confident."""
    rng = np.random.default_rng(seed)
    true_p = rng.uniform(0.05, 0.95, n)
    labels = (rng.uniform(size=n) < true_p).astype(int)
    sharp = true_p**4 / (true_p**4 + (1 - true_p) ** 4)
    return labels, np.c_[1 - sharp, sharp]


def test_ece_hand_computed():
    labels = np.array([1, 0, 1, 1])
    probs = np.array([[0.2, 0.8], [0.2, 0.8], [0.9, 0.1], [0.9, 0.1]])
    # Bin of 0.8: predicted 0.8, observed 0.5 (2 samples); bin of 0.1: predicted 0.1, observed 1.0 (2 samples).
    assert calibration.expected_calibration_error(labels, probs) == pytest.approx((2 * 0.3 + 2 * 0.9) / 4)


def test_perfect_calibration_has_slope_one():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.02, 0.98, 20000)
    labels = (rng.uniform(size=p.size) < p).astype(int)
    slope, intercept = calibration.slope_intercept(labels, np.c_[1 - p, p])
    assert slope == pytest.approx(1.0, abs=0.08) and intercept == pytest.approx(0.0, abs=0.08)
    assert calibration.expected_calibration_error(labels, np.c_[1 - p, p]) < 0.02


def test_temperature_scaling_lowers_ece_of_an_overconfident_model():
    val_labels, val_probs = overconfident(3000, 1)
    test_labels, test_probs = overconfident(3000, 2)
    temperature = calibration.fit_temperature(val_labels, val_probs)
    assert temperature > 2  # over-confident logits must be softened
    after = calibration.apply_temperature(test_probs, temperature)
    before_ece = calibration.expected_calibration_error(test_labels, test_probs)
    after_ece = calibration.expected_calibration_error(test_labels, after)
    assert after_ece < before_ece / 2
    assert calibration.slope_intercept(test_labels, test_probs)[0] < 0.5
    np.testing.assert_array_equal(after.argmax(1), test_probs.argmax(1))  # ranking unchanged


def test_reliability_rows_cover_all_samples():
    labels, probs = overconfident(500, 3)
    rows = calibration.reliability(labels, probs)
    assert sum(r["count"] for r in rows) == 500
    assert all(0 <= r["predicted"] <= 1 and 0 <= r["observed"] <= 1 for r in rows)


def test_slope_and_intercept_are_the_maximum_likelihood_fit():
    from sklearn.linear_model import LogisticRegression

    labels, probs = overconfident(2000, 4)
    slope, intercept = calibration.slope_intercept(labels, probs)
    logit = np.log(probs[:, 1] / probs[:, 0]).reshape(-1, 1)
    reference = LogisticRegression(C=np.inf, tol=1e-10, max_iter=10_000).fit(logit, labels)
    assert slope == pytest.approx(reference.coef_[0, 0], abs=1e-4)
    assert intercept == pytest.approx(reference.intercept_[0], abs=1e-4)
    separated = np.array([0, 0, 1, 1])
    assert calibration.slope_intercept(separated, np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.1, 0.9]])) == (None,
                                                                                                                   None)


def test_calibration_intervals_hold_their_point_and_repeat():
    labels, probs = overconfident(600, 5)
    first = calibration.summarise_with_ci(labels, probs, 1, 300, seed=3)
    assert first == calibration.summarise_with_ci(labels, probs, 1, 300, seed=3)
    for key in ("slope", "intercept"):
        assert first[f"{key}_ci_low"] < first[key] < first[f"{key}_ci_high"], key
    assert first["ece_ci_low"] < first["ece_ci_high"] and first["slope_ci_high"] < 1  # over-confident, surely
