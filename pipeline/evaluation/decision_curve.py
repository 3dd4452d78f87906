"""Decision-curve analysis (Vickers & Elkin 2006): is acting on the model better than treating everyone, or no one?

A reader who would act (treat, biopsy, recall) on a positive call at threshold probability t
values a true positive at 1 and a false positive at t / (1 - t): the odds at which they are
indifferent. The model's net benefit at t is ``TP/n - FP/n · t/(1 - t)`` with the images
called positive when their calibrated P(positive) is at least t; "treat all" calls every image
positive, "treat none" has net benefit 0. The model is useful at t only where it beats both.
TRIPOD+AI (item 23) asks for it where a model is meant to inform decisions.

Binary tasks only; computed on the calibrated test probabilities, with the frozen operating
threshold marked.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.core.files import rounded

THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.01), 2)
COLUMNS = ("threshold", "model", "treat_all", "treat_none")


def net_benefit(positive: np.ndarray, score: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Net benefit of calling ``score >= t`` positive, for each t in ``thresholds``."""
    n = len(positive)
    called = score[None, :] >= thresholds[:, None]
    tp = (called & positive[None, :]).sum(axis=1) / n
    fp = (called & ~positive[None, :]).sum(axis=1) / n
    return tp - fp * thresholds / (1 - thresholds)


def useful_ranges(thresholds: np.ndarray, useful: np.ndarray) -> list[list[float]]:
    """The runs of consecutive thresholds where ``useful`` holds, as [first, last] pairs."""
    ranges, start = [], None
    for i, flag in enumerate(useful):
        if flag and start is None:
            start = i
        if start is not None and (not flag or i == len(useful) - 1):
            end = i if flag else i - 1
            ranges.append([float(thresholds[start]), float(thresholds[end])])
            start = None
    return ranges


def decision_curve(labels: np.ndarray, probs: np.ndarray, positive_class: int,
                   operating: float) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """Rows (threshold, model, treat all, treat none) for the plot and the CSV, and a summary:
    net benefit at the frozen ``operating`` threshold beside treat-all's, and the threshold
    ranges where the model beats both."""
    positive = labels == positive_class
    score = probs[:, positive_class]
    model = net_benefit(positive, score, THRESHOLDS)
    prevalence = float(positive.mean())
    treat_all = prevalence - (1 - prevalence) * THRESHOLDS / (1 - THRESHOLDS)
    rows = [dict(zip(COLUMNS, (float(t), rounded(float(m)), rounded(float(a)), 0.0)))
            for t, m, a in zip(THRESHOLDS, model, treat_all)]
    at = np.array([operating])
    summary = {
        "operating_threshold": rounded(operating),
        "net_benefit": rounded(float(net_benefit(positive, score, at)[0])),
        "treat_all": rounded(float(prevalence - (1 - prevalence) * operating / (1 - operating))),
        "useful_ranges": useful_ranges(THRESHOLDS, model > np.maximum(treat_all, 0.0) + 1e-12),
    }
    return rows, summary
