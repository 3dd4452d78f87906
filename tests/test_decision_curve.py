"""Decision-curve analysis and the precision each count allows, against hand computations."""

import numpy as np
import pytest

from pipeline.evaluation import decision_curve as dca
from pipeline.evaluation.metrics import precision_of_estimates, wilson_half_width


def test_net_benefit_by_hand():
    labels = np.array([1, 1, 0, 0, 0])
    score = np.array([0.9, 0.3, 0.6, 0.2, 0.1])
    # At t = 0.5: calls 0.9 (TP) and 0.6 (FP): 1/5 - 1/5 · 0.5/0.5 = 0.
    # At t = 0.25: calls 0.9, 0.3 (TP) and 0.6 (FP): 2/5 - 1/5 · 1/3.
    found = dca.net_benefit(labels == 1, score, np.array([0.5, 0.25]))
    np.testing.assert_allclose(found, [0.0, 2 / 5 - 1 / 15])


def test_decision_curve_summary_and_rows():
    rng = np.random.default_rng(0)
    labels = (rng.uniform(size=400) < 0.2).astype(int)
    p = np.clip(0.2 + 0.6 * labels + rng.normal(0, 0.15, 400), 0.001, 0.999)
    rows, summary = dca.decision_curve(labels, np.c_[1 - p, p], 1, 0.5)
    assert [r["threshold"] for r in rows] == list(dca.THRESHOLDS) and rows[0].keys() == set(dca.COLUMNS)
    prevalence = labels.mean()
    assert rows[9]["treat_all"] == pytest.approx(prevalence - (1 - prevalence) * 0.1 / 0.9, abs=1e-6)
    assert summary["net_benefit"] == pytest.approx(dca.net_benefit(labels == 1, p, np.array([0.5]))[0], abs=1e-6)
    assert summary["useful_ranges"] and summary["useful_ranges"][0][0] <= 0.5 <= summary["useful_ranges"][0][1]
    useless = dca.decision_curve(labels, np.full((400, 2), 0.5), 1, 0.5)[1]
    assert useless["useful_ranges"] == []


def test_useful_ranges_are_runs_of_thresholds():
    t = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    assert dca.useful_ranges(t, np.array([True, True, False, True, True])) == [[0.1, 0.2], [0.4, 0.5]]
    assert dca.useful_ranges(t, np.array([False, False, True, False, False])) == [[0.3, 0.3]]


def test_wilson_half_width_and_the_counts_behind_each_estimate():
    assert wilson_half_width(96, 120) == pytest.approx(0.0711, abs=5e-4)  # sensitivity 0.8 from 120 positives
    assert wilson_half_width(0, 0) is None
    found = precision_of_estimates([[455, 25], [22, 98]], 1, ["normal", "lesion"])
    assert {k: v["n"] for k, v in found.items()} == {"accuracy": 600, "sensitivity": 120, "specificity": 480,
                                                      "ppv": 123, "npv": 477}
    assert found["sensitivity"]["value"] == pytest.approx(98 / 120, abs=1e-6)
    multi = precision_of_estimates([[5, 1, 0], [0, 3, 1], [1, 0, 4]], None, ["a", "b", "c"])
    assert set(multi) == {"accuracy", "recall_a", "recall_b", "recall_c"} and multi["recall_b"]["n"] == 4
