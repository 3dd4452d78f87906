"""The words and tables of external validation (evaluate's ``external`` record, see
:func:`pipeline.evaluate.external_validation`). Every verdict follows the numbers: a site's
ROC AUC is called lower than the internal one only where the two intervals do not overlap, a
miscalibration is named only where its interval excludes the perfect value, and each sentence
carries the numbers a reader needs to check it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.core.files import fmt
from pipeline.evaluation.metrics import summary_keys
from pipeline.evaluation.sites import INTERNAL

HEADLINE = ("roc_auc", "sensitivity", "specificity")  # one class per image; other tasks: their summary's first three


def with_ci(row: dict[str, Any], key: str) -> str:
    low, high = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
    return fmt(row.get(key)) if low is None or high is None else f"{fmt(row.get(key))} ({fmt(low)}–{fmt(high)})"


def development_prevalence(data: dict[str, Any], name: str) -> float:
    """The share of ``name`` over the development splits (train and validation) as prepared; for
    findings, among the images where it was assessed."""
    splits = [data["splits"][s] for s in ("train", "val")]
    assessed = sum(d["n"] - d.get("unknown_counts", {}).get(name, 0) for d in splits)
    return sum(d["class_counts"][name] for d in splits) / max(assessed, 1)


def apart(a: dict[str, Any], b: dict[str, Any], key: str = "roc_auc") -> int:
    """-1 where ``a``'s 95% interval of ``key`` lies wholly below ``b``'s, +1 above, 0 where they
    overlap (or one is missing): the rule for calling two estimates different, sites or subgroups."""
    bounds = (a.get(f"{key}_ci_low"), a.get(f"{key}_ci_high"), b.get(f"{key}_ci_low"), b.get(f"{key}_ci_high"))
    if None in bounds:
        return 0
    return -1 if bounds[1] < bounds[2] else 1 if bounds[0] > bounds[3] else 0


def gap(site: dict[str, Any], internal: dict[str, Any]) -> int:
    """:func:`apart` of a site's ROC AUC and the internal test split's."""
    return apart(site["test"], internal)


def excludes(row: dict[str, Any], key: str, value: float) -> int:
    """+1 where ``key``'s 95% interval lies above ``value``, -1 below, 0 where it includes it (or is missing)."""
    low, high = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
    if low is None or high is None:
        return 0
    return 1 if low > value else -1 if high < value else 0


def site_sentences(name: str, site: dict[str, Any], internal: dict[str, Any], outcome: str,
                   development: float | None, auc_name: str = "ROC AUC") -> list[str]:
    """ROC AUC (``auc_name``: the task's word for it) against the internal test split's, the
    outcome's share against development's (``development``: None where one share does not sum a
    task up, as for findings), calibration."""
    test, calib = site["test"], site["calibration"]
    auc = (f"{name}: {auc_name} {with_ci(test, 'roc_auc')} on {site['n']} images against "
           f"{with_ci(internal, 'roc_auc')} on the internal test split")
    auc += {-1: "; lower: the intervals do not overlap.", 1: "; higher: the intervals do not overlap.",
            0: "; the intervals overlap, so no difference is shown."}[gap(site, internal)]
    found = [auc]
    if development is not None:
        found.append(f"The share of {outcome} is {fmt(site['prevalence'][outcome])} at {name} against "
                     f"{fmt(round(development, 4))} in development.")
    citl = with_ci(calib, "citl")
    large = {1: f"the model under-predicts {outcome} at {name} (observed minus mean predicted {citl})",
             -1: f"the model over-predicts {outcome} at {name} (observed minus mean predicted {citl})",
             0: f"no miscalibration in the large is shown (observed minus mean predicted {citl}, the interval "
                "includes 0)"}[excludes(calib, "citl", 0.0)]
    slope = {-1: f"the probabilities are too extreme there (calibration slope {with_ci(calib, 'slope')}, below 1)",
             1: f"the probabilities are too timid there (calibration slope {with_ci(calib, 'slope')}, above 1)",
             0: f"the calibration slope {with_ci(calib, 'slope')} is consistent with 1"}[excludes(calib, "slope", 1.0)]
    return [*found, f"Calibration at {name}: {large}; {slope}."]


def heterogeneity_sentence(spread: dict[str, Any] | None, sites: int, auc_name: str = "ROC AUC") -> str:
    if spread is None:
        return (f"No heterogeneity measure: fewer than two estimates (the internal test split and the sites) have a "
                f"{auc_name} interval.")
    numbers = (f"Cochran's Q {fmt(spread['q'])} on {spread['df']} degrees of freedom, p {fmt(spread['p_value'])}, "
               f"I² {fmt(round(100 * spread['i2'], 1))}%; inverse-variance pooled {auc_name} {fmt(spread['pooled'])}")
    verdict = (f"the {auc_name}s differ between them more than chance explains" if spread["p_value"] < 0.05 else
               f"no heterogeneity beyond chance is shown (a test of {spread['df'] + 1} estimates has little power)")
    return f"Across the internal test split and {sites} external site(s): {verdict} ({numbers})."


def context(records: dict[str, Any], figure: str | None, named: Callable[[str], str]) -> dict[str, Any]:
    """The report's external validation section (``named``: the task's word for a metric); empty
    when the run had none."""
    found = records["eval"].get("external")
    if not found:
        return {}
    ev, data = records["eval"], records["data"]
    internal, sites, names = ev["test"], found["sites"], data["class_names"]
    task = ev.get("task")  # None: one class per image
    keys = HEADLINE if task is None else summary_keys(ev)[:3]
    # What calibration-in-the-large is about: P(positive class), or every assessed finding.
    outcome = "the findings" if task == "multilabel" else names[records["package"]["positive_class"]]
    share = task is None  # one class's share sums a single-label site up; findings get a table of their own
    header = ["site", "images", *([f"share of {outcome}"] if share else []),
              *[f"{named(k)} (95% CI)" for k in keys], "calibration-in-the-large (95% CI)",
              "calibration slope (95% CI)", "flagged out of distribution", "decisions unchanged under mild corruptions"]
    after = ev["calibration"]["after"]
    rows = [[INTERNAL, internal["n"], *([data["splits"]["test"]["prevalence"][outcome]] if share else []),
             *[with_ci(internal, k) for k in keys], "n/a", with_ci(after, "slope"),
             fmt(round(ev["out_of_distribution"]["test_flagged"] / internal["n"], 4)), "n/a"]]
    rows += [[name, s["n"], *([s["prevalence"][outcome]] if share else []), *[with_ci(s["test"], k) for k in keys],
              with_ci(s["calibration"], "citl"), with_ci(s["calibration"], "slope"), s["out_of_distribution"],
              fmt(s["decision_stability"].get("mean"))] for name, s in sites.items()]
    findings = [[site, finding, s["prevalence"][finding], fmt(round(development_prevalence(data, finding), 4)),
                 s["flagged"][finding], with_ci(s["test"]["findings"][finding], "sensitivity"),
                 with_ci(s["test"]["findings"][finding], "specificity")]
                for site, s in sites.items() if "flagged" in s for finding in names]
    recalibrated = [[name, r["fitted_on"], r["scored_on"], fmt(r["temperature"]), fmt(r["threshold"]),
                     *[with_ci(r[which], k) for which in ("untouched", "recalibrated") for k in keys]]
                    for name, s in sites.items() if (r := s.get("recalibrated"))]
    return {
        "intro": (f"{len(sites)} external site(s), prepared with the development data's preprocessing and checks and "
                  f"scored once by the frozen model (threshold rule {internal['threshold_rule']}); no site was used "
                  "for training or for any choice. The internal test split is the first row, for reference."),
        "header": header, "rows": rows,
        "findings": findings,
        "findings_header": ["site", "finding", "present (share of assessed)", "present in development",
                            "flagged by its frozen threshold", "sensitivity (95% CI)", "specificity (95% CI)"],
        "sentences": [line for name, s in sites.items() for line in site_sentences(
            name, s, internal, outcome, development_prevalence(data, outcome) if share else None, named("roc_auc"))],
        "heterogeneity": heterogeneity_sentence(found["heterogeneity"]["roc_auc"], len(sites), named("roc_auc")),
        "figure": figure,
        "recalibrated": recalibrated,
        "recalibrated_header": ["site", "fitted on", "scored on", "temperature", "threshold",
                                *[f"{named(k)} ({which})" for which in ("untouched", "recalibrated") for k in keys]],
    }
