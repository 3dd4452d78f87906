"""Metrics against hand-computed cases, scikit-learn and imbalanced-learn; thresholds; bootstrap."""

import numpy as np
import pytest
from imblearn.metrics import geometric_mean_score
from sklearn import metrics as skm

from pipeline.core.config import parse_threshold
from pipeline.core.errors import PipelineError
from pipeline.evaluation.metrics import (
    HEADLINE,
    average_precision,
    binary_auc,
    bootstrap_ci,
    bootstrap_headline,
    choose_threshold,
    classification_metrics,
    confusion_matrix,
    normalised,
    roc_auc,
)


def probs_for(preds, k=2):
    out = np.full((len(preds), k), 0.1 / (k - 1))
    out[np.arange(len(preds)), preds] = 0.9
    return out


def random_case(k, n=300, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[labels]
    if ties:
        logits = np.round(logits, 1)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return labels, probs


def test_binary_hand_computed():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    preds = np.array([1, 1, 1, 0, 0, 0, 0, 0, 1, 1])  # TP 3, FN 1, TN 4, FP 2
    m = classification_metrics(labels, probs_for(preds))
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["sensitivity"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(4 / 6, abs=1e-6)
    assert m["ppv"] == pytest.approx(3 / 5) and m["npv"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1), abs=1e-6)
    assert m["g_mean"] == pytest.approx(np.sqrt(0.75 * 4 / 6), abs=1e-6)
    assert confusion_matrix(labels, preds, 2) == [[4, 2], [1, 3]]
    assert normalised([[4, 2], [1, 3]]) == [[pytest.approx(4 / 6, abs=1e-6), pytest.approx(2 / 6, abs=1e-6)], [0.25, 0.75]]


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("ties", [False, True])
def test_against_scikit_learn_and_imblearn(k, ties):
    labels, probs = random_case(k, ties=ties)
    preds = probs.argmax(1)
    m = classification_metrics(labels, probs)
    average = "binary" if k == 2 else "macro"
    expected = {
        "accuracy": skm.accuracy_score(labels, preds),
        "balanced_accuracy": skm.balanced_accuracy_score(labels, preds),
        "roc_auc": skm.roc_auc_score(labels, probs[:, 1]) if k == 2 else skm.roc_auc_score(labels, probs, multi_class="ovr"),
        "sensitivity": skm.recall_score(labels, preds, average=average),
        "ppv": skm.precision_score(labels, preds, average=average),
        "f1": skm.f1_score(labels, preds, average=average),
        "mcc": skm.matthews_corrcoef(labels, preds),
        "g_mean": geometric_mean_score(labels, preds, average="multiclass"),
        "log_loss": skm.log_loss(labels, probs),
        "average_precision": (skm.average_precision_score(labels, probs[:, 1]) if k == 2 else
                              np.mean([skm.average_precision_score(labels == c, probs[:, c]) for c in range(k)])),
        "brier": (skm.brier_score_loss(labels, probs[:, 1]) if k == 2 else
                  np.mean(np.sum((probs - np.eye(k)[labels]) ** 2, axis=1))),
    }
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-5), key
    assert set(HEADLINE) <= set(m)


def test_positive_class_swaps_sensitivity_and_specificity():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    preds = np.array([1, 1, 1, 0, 0, 0, 0, 0, 1, 1])
    m1 = classification_metrics(labels, probs_for(preds), positive_class=1)
    m0 = classification_metrics(labels, probs_for(preds), positive_class=0)
    assert m0["sensitivity"] == m1["specificity"] and m0["specificity"] == m1["sensitivity"]
    assert m0["ppv"] == m1["npv"]


def test_threshold_moves_the_decision():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    assert classification_metrics(labels, probs, threshold=0.5)["sensitivity"] == 0.5
    assert classification_metrics(labels, probs, threshold=0.25)["sensitivity"] == 1.0


def test_undefined_metrics_are_none_not_nan():
    labels = np.zeros(5, dtype=int)
    m = classification_metrics(labels, probs_for(np.array([0, 1, 0, 0, 1])))
    assert m["roc_auc"] is None and m["average_precision"] is None and m["sensitivity"] is None
    assert binary_auc(np.ones(3, bool), np.arange(3.0)) is None
    assert average_precision(np.zeros(3, bool), np.arange(3.0)) is None
    assert roc_auc(labels, probs_for(np.array([0, 1, 0, 0, 1]))) is None


def test_threshold_rules():
    labels, probs = random_case(2, n=500)
    youden = choose_threshold("youden", labels, probs)
    fpr, tpr, thr = skm.roc_curve(labels, probs[:, 1], drop_intermediate=False)
    best = np.argmax(tpr - fpr)
    # Midway between the Youden vertex's score and the next lower validation score.
    assert youden == pytest.approx((thr[best] + thr[best + 1]) / 2)
    assert thr[best + 1] < youden < thr[best]
    j = classification_metrics(labels, probs, threshold=youden)
    assert j["sensitivity"] + j["specificity"] - 1 == pytest.approx(np.max(tpr - fpr))
    t95 = choose_threshold("sensitivity@0.95", labels, probs)
    assert classification_metrics(labels, probs, threshold=t95)["sensitivity"] >= 0.95
    # The highest such cut: excluding the lowest-scoring image above it misses the target.
    above = np.nextafter(probs[:, 1][probs[:, 1] > t95].min(), 1)
    assert classification_metrics(labels, probs, threshold=above)["sensitivity"] < 0.95
    assert choose_threshold("fixed:0.3", labels, probs) == 0.3
    assert choose_threshold("youden", *random_case(3)) is None
    assert parse_threshold("sensitivity@0.95") == ("sensitivity", 0.95)
    assert parse_threshold("youden") == ("youden", None)
    with pytest.raises(PipelineError, match="strictly between 0 and 1"):
        parse_threshold("fixed:1.5")
    with pytest.raises(PipelineError, match="must be youden"):
        parse_threshold("median")


def test_threshold_sits_midway_between_neighbouring_scores():
    def probs_for(score):
        return np.stack([1 - score, score], axis=1)

    labels = np.array([0, 0, 1, 1])
    probs = probs_for(np.array([0.1, 0.3, 0.7, 0.9]))
    assert choose_threshold("youden", labels, probs) == pytest.approx(0.5)  # not 0.7
    assert choose_threshold("sensitivity@0.99", labels, probs) == pytest.approx(0.5)
    everything = probs_for(np.array([0.8, 0.3, 0.7, 0.2]))  # only "all positive" reaches sensitivity 1
    assert choose_threshold("sensitivity@0.99", labels, everything) == pytest.approx(0.2)


def test_bootstrap_interval_covers_the_true_auc():
    """Scores N(0,1) vs N(d,1) have AUC Φ(d/√2); the 95% CI should cover it ~95% of the time."""
    from scipy.stats import norm

    d, n, trials, hits = 1.0, 200, 60, 0
    true_auc = norm.cdf(d / np.sqrt(2))
    for trial in range(trials):
        rng = np.random.default_rng(trial)
        labels = np.r_[np.zeros(n // 2, int), np.ones(n // 2, int)]
        score = rng.normal(size=n) + d * labels
        p1 = 1 / (1 + np.exp(-score))
        probs = np.c_[1 - p1, p1]
        low, high = bootstrap_ci(labels, probs, lambda y, p: {"roc_auc": roc_auc(y, p)}, 300, trial)["roc_auc"]
        hits += low <= true_auc <= high
    assert 0.85 <= hits / trials <= 1.0


def test_bootstrap_resamples_patients_together():
    labels = np.array([0, 0, 1, 1, 0, 1])
    probs = probs_for(labels)
    patients = np.array(["a", "a", "b", "b", "c", "c"])
    seen = []

    def spy(y, p):
        seen.append(len(y))
        return {"n": len(y)}

    bootstrap_ci(labels, probs, spy, 200, 0, groups=patients)
    assert set(seen) <= {6}  # three patients of two images each: always 6 images
    seen.clear()
    bootstrap_ci(labels, probs, spy, 200, 0, groups=np.array(["a", "a", "a", "a", "b", "c"]))
    assert len(set(seen)) > 1  # an unbalanced patient makes the resample size vary


def test_average_ranks_are_scipys_rankdata():
    from scipy.stats import rankdata

    from pipeline.evaluation.metrics import average_ranks

    rng = np.random.default_rng(0)
    for _ in range(100):
        values = rng.integers(0, 5, rng.integers(1, 40)).astype(float)  # many ties
        assert np.array_equal(average_ranks(values), rankdata(values))
    values = rng.random(500)
    assert np.array_equal(average_ranks(values), rankdata(values))


def _random_task(seed, k, n):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probs[:10] = probs[0]  # tied scores
    return labels, probs


@pytest.mark.parametrize("k,n,threshold,grouped", [(2, 200, 0.45, False), (2, 30, None, True), (3, 45, None, False),
                                                  (5, 20, None, True)])
def test_vectorised_bootstrap_gives_the_intervals_of_the_loop(k, n, threshold, grouped):
    """The same resamples scored all at once: the loop over resamples' intervals, to the 6th decimal,
    also where small resamples miss a class (metrics undefined in some draws)."""
    labels, probs = _random_task(10 + k, k, n)
    groups = np.arange(n) // 3 if grouped else None

    def scorer(y, p):
        values = classification_metrics(y, p, 1, threshold)
        return {key: values[key] for key in HEADLINE}

    loop = bootstrap_ci(labels, probs, scorer, 300, 7, groups=groups)
    fast = bootstrap_headline(labels, probs, 1, threshold, 300, 7, groups=groups)
    assert set(fast) == set(HEADLINE)
    for key in HEADLINE:
        expected = loop.get(key, (None, None))
        if expected[0] is None:
            assert fast[key] == (None, None), key
        else:
            assert fast[key] == pytest.approx(expected, abs=2e-6), key
