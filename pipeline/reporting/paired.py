"""The words and tables of a paired comparison (:mod:`pipeline.evaluation.comparison`), shared by
the report (the CNN against each baseline) and ``python -m pipeline.compare`` (model B against
model A). Every word follows the numbers: a difference is called higher or lower only where its
95% interval excludes 0, and each sentence carries the numbers a reader needs to check it."""

from __future__ import annotations

from typing import Any

from pipeline.core.files import fmt

# The differences the tables show, in order (every headline metric is in the records).
TABLE_METRICS = ("roc_auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "brier", "net_benefit")


def p_value(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def interval(row: dict[str, Any]) -> str:
    low, high = row.get("ci_low"), row.get("ci_high")
    return "n/a" if low is None or high is None else f"{fmt(low)} to {fmt(high)}"


def auc_sentence(result: dict[str, Any], a: str, b: str) -> str:
    """DeLong's verdict on ROC AUC, B against A."""
    test = result.get("delong")
    if test is None:
        return (f"ROC AUC: no DeLong test ({result['n']} test images with more than two classes; the paired "
                "bootstrap interval of the difference is in the table).")
    numbers = (f"{fmt(test['auc_b'])} against {fmt(test['auc_a'])}, difference {fmt(test['difference'])}, 95% CI "
               f"{fmt(test['ci_low'])} to {fmt(test['ci_high'])}, DeLong p {p_value(test['p_value'])}")
    if test["ci_low"] > 0 or test["ci_high"] < 0:
        direction = "higher" if test["difference"] > 0 else "lower"
        return f"ROC AUC: {b}'s is {direction} than {a}'s ({numbers})."
    return f"ROC AUC: no difference between {b} and {a} is shown ({numbers}: the interval includes 0)."


def decision_sentence(result: dict[str, Any], a: str, b: str) -> str:
    """McNemar's verdict on the decisions at each model's own operating point."""
    test = result["mcnemar"]
    counts = (f"{test['b_only']} of {result['n']} test images only {b} decides correctly, {test['a_only']} only "
              f"{a} (McNemar, {test['method']}, p {p_value(test['p_value'])})")
    if test["p_value"] < 0.05 and test["a_only"] != test["b_only"]:
        better = b if test["b_only"] > test["a_only"] else a
        return f"Decisions at each model's own operating point: {counts}; {better} decides more images correctly."
    return f"Decisions at each model's own operating point: {counts}; neither decides significantly more correctly."


def difference_cell(row: dict[str, Any]) -> str:
    return f"{fmt(row['difference'])} ({interval(row)})"


def sentences(result: dict[str, Any], a: str, b: str) -> list[str]:
    return [auc_sentence(result, a, b), decision_sentence(result, a, b)]


def table_metrics(result: dict[str, Any]) -> list[str]:
    return [k for k in TABLE_METRICS if k in result["differences"]]
