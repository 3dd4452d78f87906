"""Metrics against hand-computed cases and scikit-learn."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.metrics import classification_metrics, confusion_matrix, roc_auc


def probs_for(preds, k=2):
    out = np.full((len(preds), k), 0.1 / (k - 1))
    out[np.arange(len(preds)), preds] = 0.9
    return out


def test_binary_hand_computed():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    preds = np.array([1, 1, 1, 0, 0, 0, 0, 0, 1, 1])  # TP 3, FN 1, TN 4, FP 2
    m = classification_metrics(labels, probs_for(preds))
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["sensitivity"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(4 / 6, abs=1e-6)
    assert m["balanced_accuracy"] == pytest.approx((0.75 + 4 / 6) / 2, abs=1e-6)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1), abs=1e-6)
    assert confusion_matrix(labels, probs_for(preds)) == [[4, 2], [1, 3]]


def test_positive_class_swaps_sensitivity_and_specificity():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    preds = np.array([1, 1, 1, 0, 0, 0, 0, 0, 1, 1])
    m1 = classification_metrics(labels, probs_for(preds), positive_class=1)
    m0 = classification_metrics(labels, probs_for(preds), positive_class=0)
    assert m0["sensitivity"] == m1["specificity"] and m0["specificity"] == m1["sensitivity"]


def test_multiclass_auc_matches_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 300)
    logits = rng.normal(size=(300, 5)) + np.eye(5)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert roc_auc(labels, probs) == pytest.approx(expected)
    m = classification_metrics(labels, probs)
    assert m["balanced_accuracy"] == pytest.approx(m["sensitivity"])


def test_undefined_auc_is_none_not_nan():
    labels = np.zeros(5, dtype=int)
    assert roc_auc(labels, probs_for(np.array([0, 1, 0, 0, 1]))) is None
    assert classification_metrics(labels, probs_for(np.array([0, 1, 0, 0, 1])))["roc_auc"] is None
