"""Classification metrics, operating points and bootstrap confidence intervals.

Metrics are computed with plain numpy from the confusion matrix and score ranks (the
bootstrap calls them thousands of times; scikit-learn's input checks would dominate), and
the tests check every one against scikit-learn or imbalanced-learn.

Binary tasks report sensitivity, specificity, PPV, NPV and F1 for ``positive_class`` at a
probability threshold; multi-class tasks decide by arg-max and report macro averages
(one-vs-rest). A metric that is undefined on the given labels (AUC with one class present,
PPV with no positive call) is ``None``, never NaN, so JSON stays valid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from pipeline.core.config import parse_threshold
from pipeline.core.files import rounded

# The metric key lists, each defined once: every test metric (with CIs), the report's summary
# table, and the short comparison (baselines, `make run`'s summary).
HEADLINE = ("accuracy", "balanced_accuracy", "roc_auc", "average_precision", "sensitivity", "specificity",
            "ppv", "npv", "f1", "mcc", "g_mean", "brier", "log_loss")
SUMMARY = ("roc_auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv", "f1")
Z95 = 1.959964  # the standard normal's 97.5% quantile: two-sided 95% intervals
COMPARISON = ("roc_auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1")
# The summary of the other tasks (evaluate's metrics.json names its task when it is not one class
# per image); pipeline.tasks computes them.
TASK_SUMMARY = {"multilabel": ("roc_auc", "roc_auc_micro", "accuracy", "exact_match"),
                "ordinal": ("kappa", "mae", "accuracy", "within_one", "roc_auc")}


def summary_keys(evaluation: dict[str, Any], full: bool = False) -> tuple[str, ...]:
    """The test metrics that sum up a run's task, from evaluate's metrics: ``SUMMARY`` (with
    ``full``, every ``HEADLINE`` metric) for one class per image, ``TASK_SUMMARY`` otherwise."""
    if "task" in evaluation:
        return TASK_SUMMARY[evaluation["task"]]
    return HEADLINE if full else SUMMARY


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the mean of their ranks (scipy's ``rankdata``, in numpy: the
    training loop computes AUCs every epoch and need not load scipy.stats, 64 MB, for this)."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    group = np.cumsum(np.r_[True, ordered[1:] != ordered[:-1]]) - 1
    counts = np.bincount(group)
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = (np.cumsum(counts) - (counts - 1) / 2.0)[group]
    return ranks


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """Mann-Whitney AUC with ties counted half; None when one class is absent."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = average_ranks(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(positive: np.ndarray, score: np.ndarray) -> float | None:
    """Step-wise area under precision-recall, as scikit-learn defines it; None without positives."""
    n_pos = int(positive.sum())
    if n_pos == 0:
        return None
    order = np.argsort(-score, kind="mergesort")
    score, positive = score[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]  # last index of each distinct score
    tp = np.cumsum(positive)[last]
    precision = tp / (last + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """Binary: AUC of P(class 1). Multi-class: one-vs-rest macro AUC over the classes present."""
    present = np.unique(labels)
    if len(present) < 2:
        return None
    if probs.shape[1] == 2:
        return binary_auc(labels == 1, probs[:, 1])
    return float(np.mean([binary_auc(labels == k, probs[:, k]) for k in present]))


def decide(probs: np.ndarray, threshold: float | None, positive_class: int = 1) -> np.ndarray:
    """Predicted classes: P(positive) >= threshold for binary tasks, arg-max otherwise."""
    if probs.shape[1] == 2 and threshold is not None:
        return np.where(probs[:, positive_class] >= threshold, positive_class, 1 - positive_class)
    return probs.argmax(axis=1)


def classification_metrics(labels: np.ndarray, probs: np.ndarray, positive_class: int = 1,
                           threshold: float | None = None) -> dict[str, float | None]:
    """Every headline metric (see ``HEADLINE``) plus ``n``, at ``threshold`` (binary) or arg-max:
    :func:`weighted_metrics` with every image counted once, None where undefined."""
    values = weighted_metrics(labels, probs, np.ones((1, len(labels))), positive_class, threshold)
    return {**{key: _clean(v[0]) for key, v in values.items()}, "n": len(labels)}


def per_class_auc(labels: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict[str, float | None]:
    """One-vs-rest AUC of each class (None for a class absent from ``labels``)."""
    out = {}
    for c, name in enumerate(class_names):
        out[name] = _clean(binary_auc(labels == c, probs[:, c]))
    return out


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> list[list[int]]:
    """Counts; rows: true class, columns: predicted class."""
    return np.bincount(labels * num_classes + preds, minlength=num_classes**2).reshape(num_classes, -1).tolist()


def normalised(matrix: list[list[int]]) -> list[list[float | None]]:
    """Each row divided by its total: the fraction of each true class predicted as each class."""
    cm = np.asarray(matrix, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    return [[_clean(v) for v in row] for row in _div(cm, np.broadcast_to(rows, cm.shape))]


def wilson_half_width(successes: int, n: int, z: float = Z95) -> float | None:
    """Half the width of the 95% Wilson score interval of a proportion: how precisely ``n``
    images can estimate it (sensitivity 0.8 from 120 positives: ±0.071)."""
    if n == 0:
        return None
    p = successes / n
    return rounded(z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n))


def precision_of_estimates(matrix: list[list[int]], positive_class: int | None,
                           class_names: list[str]) -> dict[str, dict[str, Any]]:
    """For each proportion the report states at the operating point: the count it is estimated
    from, and the half-width of the 95% interval that count allows (Wilson). Binary tasks:
    sensitivity (positives), specificity (negatives), PPV (positive calls), NPV (negative
    calls) and accuracy; multi-class: accuracy and each class's recall."""
    cm = np.asarray(matrix)
    correct, total = int(np.trace(cm)), int(cm.sum())
    cells: dict[str, tuple[int, int]] = {"accuracy": (correct, total)}
    if positive_class is not None and len(cm) == 2:
        p, n = positive_class, 1 - positive_class
        cells.update(sensitivity=(int(cm[p, p]), int(cm[p].sum())), specificity=(int(cm[n, n]), int(cm[n].sum())),
                     ppv=(int(cm[p, p]), int(cm[:, p].sum())), npv=(int(cm[n, n]), int(cm[:, n].sum())))
    else:
        cells.update({f"recall_{name}": (int(cm[k, k]), int(cm[k].sum())) for k, name in enumerate(class_names)})
    return {key: {"value": rounded(k / n) if n else None, "n": n, "half_width": wilson_half_width(k, n)}
            for key, (k, n) in cells.items()}


def _youden(fpr: np.ndarray, tpr: np.ndarray, value: float | None) -> int:
    return int(np.argmax(tpr - fpr))  # maximises sensitivity + specificity - 1


def _sensitivity_at(fpr: np.ndarray, tpr: np.ndarray, value: float | None) -> int:
    return int(np.flatnonzero(tpr >= value)[0])  # the highest cut reaching the target sensitivity


# Threshold rules (``evaluate.threshold``): the index of the chosen cut on the validation ROC
# curve; ``fixed`` needs no curve (see :func:`choose_threshold`).
THRESHOLD_RULES: dict[str, Callable[[np.ndarray, np.ndarray, float | None], int] | None] = {
    "youden": _youden,
    "sensitivity": _sensitivity_at,
    "fixed": None,
}


def choose_threshold(rule: str, labels: np.ndarray, probs: np.ndarray, positive_class: int = 1) -> float | None:
    """The binary operating point under ``rule``, from (validation) labels and probabilities.

    ``youden``: maximises sensitivity + specificity - 1; ``sensitivity@S``: the highest
    cut whose sensitivity is at least S; ``fixed:T``: T. Multi-class tasks return None
    (arg-max decides).

    Every threshold between two neighbouring validation scores classifies validation alike;
    the cut is placed midway between them rather than on the lowest included image's score,
    so that a new image scoring a hair below that one is not called negative. On small
    validation sets (BreastMNIST: 78 images) this margin is what keeps the operating point
    stable on unseen data.
    """
    if probs.shape[1] != 2:
        return None
    name, value = parse_threshold(rule)
    pick = THRESHOLD_RULES[name]
    if pick is None:
        return value
    y, score = labels == positive_class, probs[:, positive_class]
    if y.all() or not y.any():
        return 0.5
    from sklearn.metrics import roc_curve  # imported here: the key lists above are read by light stages too

    # Every distinct score is a threshold (positive when score >= t), highest first.
    fpr, tpr, thresholds = roc_curve(y, score, drop_intermediate=False)
    thresholds = np.minimum(thresholds, 1.0)  # sklearn's first threshold is +inf
    chosen = pick(fpr, tpr, value)
    if chosen + 1 == len(thresholds):
        return float(thresholds[chosen])  # everything positive: the lowest score itself
    return float((thresholds[chosen] + thresholds[chosen + 1]) / 2)


def _resamples(n: int, n_resamples: int, seed: int, groups: np.ndarray | None) -> Iterator[np.ndarray]:
    """The rows of each bootstrap resample (whole patients when ``groups`` is given), seeded."""
    rng = np.random.default_rng([seed, 11])
    if groups is None:
        for _ in range(n_resamples):
            yield rng.integers(0, n, n)
        return
    _, inverse = np.unique(groups, return_inverse=True)
    units = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
    for _ in range(n_resamples):
        yield np.concatenate([units[u] for u in rng.integers(0, len(units), len(units))])


def _intervals(draws: dict[str, list[float] | np.ndarray], n_resamples: int,
               level: float) -> dict[str, tuple[float | None, float | None]]:
    """Percentile interval of each metric's defined draws; none for a metric undefined in more
    than 5% of the resamples."""
    alpha = (1 - level) / 2
    out = {}
    for key, values in draws.items():
        if len(values) < 0.95 * n_resamples:
            out[key] = (None, None)
        else:
            out[key] = (_clean(np.quantile(values, alpha)), _clean(np.quantile(values, 1 - alpha)))
    return out


def bootstrap_ci(labels: np.ndarray, probs: np.ndarray, metric_fn: Callable[[np.ndarray, np.ndarray], dict],
                 n_resamples: int, seed: int, groups: np.ndarray | None = None,
                 level: float = 0.95) -> dict[str, tuple[float | None, float | None]]:
    """Percentile bootstrap interval of every metric ``metric_fn`` returns.

    With ``groups`` (pseudonymised patient ids), whole patients are resampled, so images of
    one patient stay together and the interval is not falsely narrow.
    """
    draws: dict[str, list[float]] = {}
    for idx in _resamples(len(labels), n_resamples, seed, groups):
        for key, value in metric_fn(labels[idx], probs[idx]).items():
            if value is not None:
                draws.setdefault(key, []).append(value)
    return _intervals(draws, n_resamples, level)


def bootstrap_headline(labels: np.ndarray, probs: np.ndarray, positive_class: int, threshold: float | None,
                       n_resamples: int, seed: int, groups: np.ndarray | None = None,
                       level: float = 0.95) -> dict[str, tuple[float | None, float | None]]:
    """:func:`bootstrap_ci` of every ``HEADLINE`` metric of :func:`classification_metrics`, the
    same resamples and intervals, computed for all resamples at once.

    A resample is a row of counts (how often it drew each image), and every headline metric is
    a weighted sum over images (or, for ROC AUC and average precision, over score-ordered
    images), so one matrix product or cumulative sum serves them all: 6× faster than scoring
    1,000 resamples one by one on 600 test images, 3× on 5,000, with the same bytes. The count
    matrices are taken a block of resamples at a time, at most a million counts (8 MB) each.
    """
    draws: dict[str, list[np.ndarray]] = {key: [] for key in HEADLINE}
    rows = _resamples(len(labels), n_resamples, seed, groups)
    block = max(1, min(100, 1_000_000 // max(len(labels), 1)))
    for start in range(0, n_resamples, block):
        counts = np.stack([np.bincount(next(rows), minlength=len(labels))
                           for _ in range(min(block, n_resamples - start))]).astype(np.float64)
        for key, values in weighted_metrics(labels, probs, counts, positive_class, threshold).items():
            draws[key].append(values)
    defined = {}
    for key, parts in draws.items():
        values = np.concatenate(parts)
        defined[key] = [_clean(v) for v in values[np.isfinite(values)]]
    return _intervals(defined, n_resamples, level)


def weighted_metrics(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray, positive_class: int = 1,
                     threshold: float | None = None) -> dict[str, np.ndarray]:
    """Every ``HEADLINE`` metric for each row of ``weights`` (R×N image counts), as R values (NaN
    where undefined): the metrics of the images each row draws, with repeats.

    Binary tasks report sensitivity, specificity, PPV, NPV, F1 and average precision for
    ``positive_class`` and ROC AUC of class 1; multi-class tasks the mean over classes of each
    (ROC AUC and average precision one-vs-rest, over the classes drawn). Balanced accuracy and
    G-mean are the mean and geometric mean of the drawn classes' recalls; MCC is Gorodkin's
    multi-class form (0 when undefined); Brier score and log loss are per-image means."""
    n_rows, k = len(weights), probs.shape[1]
    preds = decide(probs, threshold, positive_class)
    cells = labels * k + preds  # each image's confusion-matrix cell
    cm = np.stack([np.bincount(cells, weights=w, minlength=k * k) for w in weights]).reshape(n_rows, k, k)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    fn, fp = cm.sum(axis=2) - tp, cm.sum(axis=1) - tp
    total = cm.sum(axis=(1, 2))
    tn = total[:, None] - tp - fn - fp
    recall, specificity = _div(tp, tp + fn), _div(tn, tn + fp)
    ppv, npv, f1 = _div(tp, tp + fp), _div(tn, tn + fn), _div(2 * tp, 2 * tp + fp + fn)
    present = (tp + fn) > 0  # classes drawn in each resample
    onehot = np.eye(k)[labels]
    if k == 2:
        pick = positive_class
        sens, spec, ppv_, npv_, f1_ = recall[:, pick], specificity[:, pick], ppv[:, pick], npv[:, pick], f1[:, pick]
        auc = _weighted_auc(labels == 1, probs[:, 1], weights)
        ap = _weighted_ap(labels == pick, probs[:, pick], weights)
        brier = weights @ (probs[:, pick] - onehot[:, pick]) ** 2 / total
    else:
        sens, spec, ppv_, npv_, f1_ = (_row_nanmean(v) for v in (recall, specificity, ppv, npv, f1))
        per_class = [(_weighted_auc(labels == c, probs[:, c], weights), _weighted_ap(labels == c, probs[:, c], weights))
                     for c in range(k)]
        auc = _row_nanmean(np.stack([a for a, _ in per_class], axis=1))
        ap = _row_nanmean(np.stack([p for _, p in per_class], axis=1))
        brier = weights @ np.sum((probs - onehot) ** 2, axis=1) / total
    auc = np.where(present.sum(axis=1) >= 2, auc, np.nan)
    t, p, c = cm.sum(axis=2), cm.sum(axis=1), np.trace(cm, axis1=1, axis2=2)
    den = np.sqrt((total**2 - np.einsum("rk,rk->r", p, p)) * (total**2 - np.einsum("rk,rk->r", t, t)))
    mcc = _div(c * total - np.einsum("rk,rk->r", t, p), den)
    kept = np.where(present, recall, 1.0)  # recall of the classes present in each resample
    log_loss = weights @ -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-15, 1)) / total
    return {
        "accuracy": c / total,
        "balanced_accuracy": np.where(present, recall, 0.0).sum(axis=1) / present.sum(axis=1),
        "roc_auc": auc,
        "average_precision": ap,
        "sensitivity": sens,
        "specificity": spec,
        "ppv": ppv_,
        "npv": npv_,
        "f1": f1_,
        "mcc": np.where(den > 0, mcc, 0.0),
        "g_mean": np.prod(kept, axis=1) ** (1 / present.sum(axis=1)),
        "brier": brier,
        "log_loss": log_loss,
    }


def _score_groups(score: np.ndarray, descending: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The order that sorts ``score`` and where each run of equal scores starts in it."""
    order = np.argsort(-score if descending else score, kind="mergesort")
    ordered = score[order]
    return order, np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])


def _weighted_auc(positive: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC (ties half) per row of image counts; NaN where a class is not drawn."""
    order, starts = _score_groups(score)
    w = weights[:, order]
    pos = np.add.reduceat(w * positive[order], starts, axis=1)
    neg = np.add.reduceat(w * ~positive[order], starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    return _div(np.sum(pos * (below + neg / 2), axis=1), pos.sum(axis=1) * neg.sum(axis=1))


def _weighted_ap(positive: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """:func:`average_precision` per row of image counts; NaN where no positive is drawn."""
    order, starts = _score_groups(score, descending=True)
    w = weights[:, order]
    tp = np.cumsum(np.add.reduceat(w * positive[order], starts, axis=1), axis=1)
    seen = np.cumsum(np.add.reduceat(w, starts, axis=1), axis=1)
    n_pos = tp[:, -1:]
    recall_step = np.diff(np.c_[np.zeros(len(w)), tp], axis=1)
    return _div(np.sum(recall_step * _div(tp, seen, 0.0), axis=1), n_pos[:, 0])


def _row_nanmean(values: np.ndarray) -> np.ndarray:
    """Mean of each row over its finite entries; NaN for a row with none."""
    finite = np.isfinite(values)
    return _div(np.where(finite, values, 0.0).sum(axis=1), finite.sum(axis=1))


def _div(num: np.ndarray, den: np.ndarray, undefined: float = np.nan) -> np.ndarray:
    num, den = np.broadcast_arrays(np.asarray(num, float), np.asarray(den, float))
    return np.divide(num, den, out=np.full(num.shape, undefined), where=den > 0)


def _clean(value: object) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    return None if math.isnan(value) else rounded(value)
