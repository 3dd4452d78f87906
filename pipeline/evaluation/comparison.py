"""Paired comparison of two models scored on the same test images: is B really better than A?

Two models' estimates on one test split are correlated (the same hard images trip both), so
comparing their confidence intervals side by side is too conservative, and a difference can
only be judged paired, image by image:

- **DeLong's test** (DeLong, DeLong & Clarke-Pearson 1988) for the difference of two correlated
  ROC AUCs, with its 95% interval, computed with Sun & Xu's (2014) mid-rank algorithm:
  O(n log n) instead of the n_pos × n_neg placement matrix. Binary tasks (the positive class).
- **McNemar's test** on the images exactly one model decides correctly, each at its own frozen
  operating point (its threshold, or arg-max): exact binomial below 25 discordant images, else
  the chi-square with continuity correction (Edwards 1948).
- **Paired bootstrap** intervals of the difference (B − A) of every headline metric and of net
  benefit: the same resamples (whole patients where known) score both models.

Differences are always B − A: with A the reference (the model in use, or the CNN against a
baseline as B), a positive ROC AUC difference means B ranks better.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.core.files import rounded
from pipeline.evaluation.metrics import (
    HEADLINE,
    Z95,
    _intervals,
    _resamples,
    average_ranks,
    decide,
    weighted_metrics,
)

EXACT_BELOW = 25  # discordant images below which McNemar's test is the exact binomial one


def delong(positive: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> dict[str, Any]:
    """Both AUCs, their difference (B − A) with its DeLong standard error and 95% interval, the z
    statistic and the two-sided p-value. Scores identical on every image give difference 0, p 1."""
    from scipy.stats import norm

    positive = np.asarray(positive, dtype=bool)
    m, n = int(positive.sum()), int((~positive).sum())
    if m == 0 or n == 0:
        raise ValueError("DeLong's test needs positive and negative images")
    scores = np.stack([np.asarray(score_a, np.float64), np.asarray(score_b, np.float64)])
    pos, neg = scores[:, positive], scores[:, ~positive]
    # Sun & Xu: mid-ranks within positives, within negatives and over all images give each
    # image's placement value (its structural component) without comparing every pair.
    v_pos, v_neg, auc = np.empty((2, m)), np.empty((2, n)), np.empty(2)
    for k in range(2):
        within_pos, within_neg = average_ranks(pos[k]), average_ranks(neg[k])
        overall = average_ranks(np.r_[pos[k], neg[k]])
        auc[k] = overall[:m].sum() / (m * n) - (m + 1) / (2 * n)
        v_pos[k] = (overall[:m] - within_pos) / n  # share of negatives each positive outranks
        v_neg[k] = 1 - (overall[m:] - within_neg) / m  # share of positives that outrank each negative
    covariance = np.cov(v_pos) / m + np.cov(v_neg) / n
    variance = float(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1])
    difference = float(auc[1] - auc[0])
    se = float(np.sqrt(max(variance, 0.0)))
    if se == 0.0:
        z, p = 0.0, 1.0 if difference == 0 else 0.0
    else:
        z = difference / se
        p = float(2 * norm.sf(abs(z)))
    return {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "difference": difference, "se": se,
            "ci_low": difference - Z95 * se, "ci_high": difference + Z95 * se, "z": z, "p_value": p}


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, Any]:
    """McNemar's test of paired decisions: the images only A decides correctly (``a_only``), only B
    (``b_only``), both and neither; the statistic, the p-value and which form was used."""
    from scipy.stats import binom, chi2

    correct_a, correct_b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    a_only, b_only = int((correct_a & ~correct_b).sum()), int((~correct_a & correct_b).sum())
    discordant = a_only + b_only
    counts = {"a_only": a_only, "b_only": b_only, "both": int((correct_a & correct_b).sum()),
              "neither": int((~correct_a & ~correct_b).sum())}
    if discordant == 0:
        return {**counts, "statistic": 0.0, "p_value": 1.0, "method": "no discordant images"}
    if discordant < EXACT_BELOW:
        p = min(1.0, 2 * float(binom.cdf(min(a_only, b_only), discordant, 0.5)))
        return {**counts, "statistic": float(min(a_only, b_only)), "p_value": p, "method": "exact binomial"}
    statistic = (abs(a_only - b_only) - 1) ** 2 / discordant
    return {**counts, "statistic": float(statistic), "p_value": float(chi2.sf(statistic, 1)),
            "method": "chi-square, continuity-corrected"}


def net_benefit_rows(positive: np.ndarray, called: np.ndarray, weights: np.ndarray, at: float) -> np.ndarray:
    """Net benefit ``TP/n − FP/n · t/(1 − t)`` of the decisions ``called``, valued at threshold
    probability ``at``, for each row of image counts ``weights``."""
    total = weights.sum(axis=1)
    tp = weights @ (called & positive).astype(np.float64)
    fp = weights @ (called & ~positive).astype(np.float64)
    return (tp - fp * at / (1 - at)) / total


def paired_bootstrap(labels: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, threshold_a: float | None,
                     threshold_b: float | None, positive_class: int, n_resamples: int, seed: int,
                     groups: np.ndarray | None = None, valued_at: float | None = None
                     ) -> dict[str, dict[str, float | None]]:
    """Difference (B − A) of every headline metric, each model at its own frozen decision, with a
    95% percentile interval from resamples that draw the same images (patients) for both; for
    binary tasks also the net benefit of the two models' decisions, valued at threshold
    probability ``valued_at`` (default: A's threshold)."""
    counts = np.stack([np.bincount(rows, minlength=len(labels))
                       for rows in _resamples(len(labels), n_resamples, seed, groups)]).astype(np.float64)
    once = np.ones((1, len(labels)))
    binary = probs_a.shape[1] == 2 and threshold_a is not None and threshold_b is not None

    def both(weights: np.ndarray) -> dict[str, np.ndarray]:
        a = weighted_metrics(labels, probs_a, weights, positive_class, threshold_a)
        b = weighted_metrics(labels, probs_b, weights, positive_class, threshold_b)
        out = {key: b[key] - a[key] for key in HEADLINE}
        if binary:
            positive = labels == positive_class
            called_a = decide(probs_a, threshold_a, positive_class) == positive_class
            called_b = decide(probs_b, threshold_b, positive_class) == positive_class
            at = threshold_a if valued_at is None else valued_at
            out["net_benefit"] = (net_benefit_rows(positive, called_b, weights, at)
                                  - net_benefit_rows(positive, called_a, weights, at))
        return out

    point, draws = both(once), both(counts)
    intervals = _intervals({k: v[np.isfinite(v)] for k, v in draws.items()}, n_resamples, 0.95)
    return {key: {"difference": rounded(float(point[key][0])) if np.isfinite(point[key][0]) else None,
                  "ci_low": intervals[key][0], "ci_high": intervals[key][1]} for key in point}


def compare(labels: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, threshold_a: float | None,
            threshold_b: float | None, positive_class: int, n_resamples: int, seed: int,
            groups: np.ndarray | None = None, valued_at: float | None = None) -> dict[str, Any]:
    """The whole paired comparison of B against A on one test split: DeLong (binary tasks),
    McNemar at each model's own decision, and the paired bootstrap of every difference (net
    benefit valued at ``valued_at``, default A's threshold)."""
    labels = np.asarray(labels)
    correct_a = decide(probs_a, threshold_a, positive_class) == labels
    correct_b = decide(probs_b, threshold_b, positive_class) == labels
    result: dict[str, Any] = {"n": len(labels), "mcnemar": _rounded(mcnemar(correct_a, correct_b)),
                              "differences": paired_bootstrap(labels, probs_a, probs_b, threshold_a, threshold_b,
                                                              positive_class, n_resamples, seed, groups, valued_at)}
    if probs_a.shape[1] == 2:
        positive = labels == 1  # ROC AUC is that of class 1, as everywhere in the pipeline
        result["delong"] = _rounded(delong(positive, probs_a[:, 1], probs_b[:, 1]))
    return result


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    return {k: rounded(v) if isinstance(v, float) else v for k, v in values.items()}
