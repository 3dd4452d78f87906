"""Classification metrics shared by training (validation AUC) and evaluation.

Binary tasks report sensitivity, specificity and F1 for ``positive_class``; multi-class tasks
report their macro averages (one-vs-rest). A metric that is undefined on the given labels
(e.g. AUC with one class present) is ``None``, never NaN, so JSON stays valid.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn import metrics as skm


def roc_auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """Binary: AUC of P(class 1). Multi-class: one-vs-rest macro AUC."""
    if len(np.unique(labels)) < 2:
        return None
    if probs.shape[1] == 2:
        return float(skm.roc_auc_score(labels, probs[:, 1]))
    present = np.unique(labels)
    if len(present) < probs.shape[1]:
        # sklearn's multi-class AUC needs every class present; average over the ones that are.
        return float(np.mean([skm.roc_auc_score(labels == k, probs[:, k]) for k in present]))
    return float(skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


def classification_metrics(labels: np.ndarray, probs: np.ndarray, positive_class: int = 1) -> dict[str, float | None]:
    """Headline metrics at the arg-max decision (threshold 0.5 for binary tasks)."""
    num_classes = probs.shape[1]
    preds = probs.argmax(axis=1)
    cm = skm.confusion_matrix(labels, preds, labels=list(range(num_classes)))
    per_class_recall = _safe_div(np.diag(cm), cm.sum(axis=1))
    # Specificity of class k: true negatives / all negatives, one-vs-rest.
    negatives = cm.sum() - cm.sum(axis=1)
    true_negatives = negatives - (cm.sum(axis=0) - np.diag(cm))
    per_class_specificity = _safe_div(true_negatives, negatives)
    if num_classes == 2:
        sensitivity = per_class_recall[positive_class]
        specificity = per_class_specificity[positive_class]
        f1 = skm.f1_score(labels, preds, pos_label=positive_class, average="binary", zero_division=0)
    else:
        sensitivity = np.nanmean(per_class_recall)
        specificity = np.nanmean(per_class_specificity)
        f1 = skm.f1_score(labels, preds, average="macro", labels=list(range(num_classes)), zero_division=0)
    values = {
        "accuracy": skm.accuracy_score(labels, preds),
        "balanced_accuracy": np.nanmean(per_class_recall),
        "roc_auc": roc_auc(labels, probs),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "f1": f1,
        "n": len(labels),
    }
    return {k: _clean(v) for k, v in values.items()}


def confusion_matrix(labels: np.ndarray, probs: np.ndarray) -> list[list[int]]:
    """Rows: true class; columns: predicted class (arg-max)."""
    cm = skm.confusion_matrix(labels, probs.argmax(axis=1), labels=list(range(probs.shape[1])))
    return cm.astype(int).tolist()


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = num.astype(float), den.astype(float)
    return np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0)


def _clean(value: object) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    return None if math.isnan(value) else round(value, 6)
