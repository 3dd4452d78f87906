"""Paired comparison statistics: DeLong against the 1988 definition computed pair by pair,
McNemar against hand-computed counts, the paired bootstrap against its invariants."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.evaluation import comparison


def delong_by_definition(positive, score_a, score_b):
    """DeLong et al. (1988) as written: the kernel ψ over every positive-negative pair, the
    structural components V10 (per positive) and V01 (per negative), their covariances."""
    aucs, components = [], []
    for score in (score_a, score_b):
        x, y = score[positive], score[~positive]
        psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
        components.append((psi.mean(axis=1), psi.mean(axis=0)))
        aucs.append(psi.mean())
    m, n = positive.sum(), (~positive).sum()
    s10 = np.cov(np.stack([c[0] for c in components]))
    s01 = np.cov(np.stack([c[1] for c in components]))
    s = s10 / m + s01 / n
    return aucs, aucs[1] - aucs[0], np.sqrt(s[0, 0] + s[1, 1] - 2 * s[0, 1])


@pytest.mark.parametrize("ties", [False, True])
def test_delong_matches_the_pairwise_definition_and_sklearn(ties):
    rng = np.random.default_rng(0)
    positive = rng.random(300) < 0.3
    a = positive * 0.8 + rng.normal(0, 1, 300)
    b = positive * 1.4 + rng.normal(0, 1, 300)
    if ties:  # scores on a coarse grid, as a thresholded or rounded model gives
        a, b = np.round(a, 1), np.round(b, 1)
    result = comparison.delong(positive, a, b)
    aucs, difference, se = delong_by_definition(positive, a, b)
    assert result["auc_a"] == pytest.approx(roc_auc_score(positive, a)) == pytest.approx(aucs[0])
    assert result["auc_b"] == pytest.approx(roc_auc_score(positive, b))
    assert result["difference"] == pytest.approx(difference)
    assert result["se"] == pytest.approx(se, rel=1e-9)
    assert result["ci_low"] == pytest.approx(difference - 1.959964 * se)
    # B is clearly better on 300 images: a small p, and the interval excludes 0.
    assert result["difference"] > 0 and result["p_value"] < 0.01 and result["ci_low"] > 0


def test_delong_is_antisymmetric_and_null_for_the_same_model():
    rng = np.random.default_rng(1)
    positive = rng.random(120) < 0.5
    a, b = positive + rng.normal(0, 1, 120), positive + rng.normal(0, 1, 120)
    ab, ba = comparison.delong(positive, a, b), comparison.delong(positive, b, a)
    assert ab["difference"] == pytest.approx(-ba["difference"]) and ab["p_value"] == pytest.approx(ba["p_value"])
    same = comparison.delong(positive, a, a)
    assert same["difference"] == 0 and same["p_value"] == 1.0
    # A monotone transformation of a score is the same ranking: nothing to test.
    assert comparison.delong(positive, a, np.exp(a))["p_value"] == 1.0
    with pytest.raises(ValueError, match="positive and negative"):
        comparison.delong(np.zeros(5, bool), a[:5], b[:5])


def test_mcnemar_against_hand_computed_counts():
    # 10 images only A gets right, 2 only B: exact two-sided p = 2·P(X ≤ 2 | 12, ½) = 2·79/4096.
    correct_a = np.array([1] * 10 + [0] * 2 + [1] * 50 + [0] * 8, bool)
    correct_b = np.array([0] * 10 + [1] * 2 + [1] * 50 + [0] * 8, bool)
    exact = comparison.mcnemar(correct_a, correct_b)
    assert (exact["a_only"], exact["b_only"], exact["both"], exact["neither"]) == (10, 2, 50, 8)
    assert exact["method"] == "exact binomial" and exact["p_value"] == pytest.approx(2 * 79 / 4096)
    # 30 against 15 discordant: chi-square (|30 − 15| − 1)² / 45 = 4.3556, p = 0.03689.
    correct_a = np.array([1] * 30 + [0] * 15, bool)
    chi = comparison.mcnemar(correct_a, ~correct_a)
    assert chi["method"] == "chi-square, continuity-corrected"
    assert chi["statistic"] == pytest.approx(196 / 45) and chi["p_value"] == pytest.approx(0.036888, abs=1e-5)
    assert comparison.mcnemar(correct_a, correct_a)["p_value"] == 1.0


def test_paired_bootstrap_differences_and_intervals():
    rng = np.random.default_rng(2)
    labels = (rng.random(400) < 0.25).astype(int)
    p_a = np.clip(0.25 + 0.3 * labels + rng.normal(0, 0.2, 400), 0.001, 0.999)
    p_b = np.clip(0.2 + 0.5 * labels + rng.normal(0, 0.15, 400), 0.001, 0.999)
    probs_a, probs_b = np.stack([1 - p_a, p_a], 1), np.stack([1 - p_b, p_b], 1)
    result = comparison.compare(labels, probs_a, probs_b, 0.4, 0.45, 1, 300, seed=0)
    d = result["differences"]
    # The point differences are those of the models' own metrics at their own thresholds.
    assert d["roc_auc"]["difference"] == pytest.approx(roc_auc_score(labels, p_b) - roc_auc_score(labels, p_a),
                                                       abs=1e-6)
    sens_a, sens_b = (p_a[labels == 1] >= 0.4).mean(), (p_b[labels == 1] >= 0.45).mean()
    assert d["sensitivity"]["difference"] == pytest.approx(sens_b - sens_a, abs=1e-6)
    for key, row in d.items():
        assert row["ci_low"] <= row["difference"] <= row["ci_high"], key
    assert d["roc_auc"]["ci_low"] > 0 and result["delong"]["p_value"] < 0.001
    assert set(d) == {*comparison.HEADLINE, "net_benefit"}
    # Net benefit at A's threshold t = 0.4: TP/n − FP/n · t/(1 − t), each model deciding at its own.
    def nb(p, t):
        called = p >= t
        return ((called & (labels == 1)).sum() - (called & (labels == 0)).sum() * 0.4 / 0.6) / 400
    assert d["net_benefit"]["difference"] == pytest.approx(nb(p_b, 0.45) - nb(p_a, 0.4), abs=1e-6)
    # A model against itself: every difference 0 and McNemar finds nothing.
    same = comparison.compare(labels, probs_a, probs_a, 0.4, 0.4, 1, 50, seed=0)
    assert all(row["difference"] == 0 and row["ci_low"] == row["ci_high"] == 0 for row in same["differences"].values())
    assert same["mcnemar"]["p_value"] == 1.0 and same["delong"]["p_value"] == 1.0
    # Seeded: the same intervals again; patients resampled whole give other ones.
    assert comparison.compare(labels, probs_a, probs_b, 0.4, 0.45, 1, 300, seed=0) == result
    patients = np.repeat(np.arange(100), 4)
    grouped = comparison.compare(labels, probs_a, probs_b, 0.4, 0.45, 1, 300, seed=0, groups=patients)
    assert grouped["differences"]["roc_auc"]["difference"] == d["roc_auc"]["difference"]
    assert grouped["differences"]["roc_auc"]["ci_low"] != d["roc_auc"]["ci_low"]


def test_multiclass_comparison_has_mcnemar_and_bootstrap_but_no_delong():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 200)
    probs = rng.dirichlet(np.ones(3), 200)
    better = 0.5 * probs + 0.5 * np.eye(3)[labels]
    result = comparison.compare(labels, probs, better, None, None, 1, 100, seed=0)
    assert "delong" not in result and "net_benefit" not in result["differences"]
    assert result["mcnemar"]["b_only"] > result["mcnemar"]["a_only"]
    assert result["differences"]["accuracy"]["difference"] > 0
