"""How a frozen model transports to other sites (external validation, TRIPOD+AI 12e, CLAIM 32).

- **Calibration-in-the-large** (observed prevalence − mean predicted probability: 0 when the
  model predicts the site's rate on average) and the **calibration slope** (logistic
  recalibration: 1 when its spread is right, < 1 when over-confident), with bootstrap CIs.
- **Decision stability**: the share of a site's decisions unchanged under each mild image
  corruption (severity 1 of :mod:`pipeline.evaluation.corruptions`).
- **Heterogeneity** across sites of one estimate with CIs (ROC AUC, say): Cochran's Q and
  Higgins' I² (the share of the spread between sites beyond what chance explains), standard
  errors read off the 95% intervals.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.core.files import rounded
from pipeline.evaluation.calibration import slope_intercept
from pipeline.evaluation.metrics import Z95, bootstrap_ci

INTERNAL = "internal test"  # the development data's test split, first in sites.csv and the forest plot


def transport_calibration(labels: np.ndarray, probs: np.ndarray, positive_class: int, n_resamples: int, seed: int,
                          groups: np.ndarray | None = None) -> dict[str, float | None]:
    """Calibration-in-the-large and slope of P(positive), each with a 95% bootstrap interval."""
    def measure(y: np.ndarray, p: np.ndarray) -> dict[str, float | None]:
        outcome = (y == positive_class).astype(np.float64)
        slope, _ = slope_intercept(y, p, positive_class)
        return {"citl": float(outcome.mean() - p[:, positive_class].mean()), "slope": slope}

    point = measure(labels, probs)
    out: dict[str, float | None] = {k: rounded(v) if v is not None else None for k, v in point.items()}
    for key, (low, high) in bootstrap_ci(labels, probs, measure, n_resamples, seed, groups).items():
        out.update({f"{key}_ci_low": low, f"{key}_ci_high": high})
    return out


def heterogeneity(estimates: dict[str, tuple[float | None, float | None, float | None]]) -> dict[str, Any] | None:
    """Cochran's Q, its p-value and I² over ``{site: (estimate, ci_low, ci_high)}``; the
    inverse-variance pooled estimate. None with fewer than two sites that have an interval."""
    from scipy.stats import chi2

    usable = {k: v for k, v in estimates.items() if None not in v and v[2] > v[1]}
    if len(usable) < 2:
        return None
    value = np.array([v[0] for v in usable.values()])
    se = np.array([(v[2] - v[1]) / (2 * Z95) for v in usable.values()])
    weight = 1 / se**2
    pooled = float((weight * value).sum() / weight.sum())
    q = float((weight * (value - pooled) ** 2).sum())
    df = len(usable) - 1
    return {"sites": list(usable), "q": rounded(q), "df": df, "p_value": rounded(float(chi2.sf(q, df))),
            "i2": rounded(max(0.0, (q - df) / q) if q > 0 else 0.0), "pooled": rounded(pooled)}
