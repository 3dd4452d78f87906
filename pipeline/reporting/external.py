"""The words and tables of external validation (evaluate's ``external`` record, see
:func:`pipeline.evaluate.external_validation`). Every verdict follows the numbers: a site's
ROC AUC is called lower than the internal one only where the two intervals do not overlap, a
miscalibration is named only where its interval excludes the perfect value, and each sentence
carries the numbers a reader needs to check it."""

from __future__ import annotations

from typing import Any

from pipeline.core.files import fmt

INTERNAL = "internal test"  # the forest plot's and sites.csv's name for the development data's test split
HEADLINE = ("roc_auc", "sensitivity", "specificity")
RECALIBRATED = ("sensitivity", "specificity", "accuracy")


def with_ci(row: dict[str, Any], key: str) -> str:
    low, high = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
    return fmt(row.get(key)) if low is None or high is None else f"{fmt(row.get(key))} ({fmt(low)}–{fmt(high)})"


def development_prevalence(data: dict[str, Any], positive: str) -> float:
    """P(positive) over the development splits (train and validation) as prepared."""
    counts = [data["splits"][s]["class_counts"] for s in ("train", "val")]
    return sum(c[positive] for c in counts) / sum(sum(c.values()) for c in counts)


def gap(site: dict[str, Any], internal: dict[str, Any]) -> int:
    """-1 where the site's ROC AUC interval lies wholly below the internal test split's, +1 above, else 0."""
    a, b = site["test"], internal
    if None in (a.get("roc_auc_ci_low"), a.get("roc_auc_ci_high"), b.get("roc_auc_ci_low"), b.get("roc_auc_ci_high")):
        return 0
    return -1 if a["roc_auc_ci_high"] < b["roc_auc_ci_low"] else 1 if a["roc_auc_ci_low"] > b["roc_auc_ci_high"] else 0


def excludes(row: dict[str, Any], key: str, value: float) -> int:
    """+1 where ``key``'s 95% interval lies above ``value``, -1 below, 0 where it includes it (or is missing)."""
    low, high = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
    if low is None or high is None:
        return 0
    return 1 if low > value else -1 if high < value else 0


def site_sentences(name: str, site: dict[str, Any], internal: dict[str, Any], positive: str,
                   development: float) -> list[str]:
    test, calib = site["test"], site["calibration"]
    auc = (f"{name}: ROC AUC {with_ci(test, 'roc_auc')} on {site['n']} images against {with_ci(internal, 'roc_auc')} "
           f"on the internal test split")
    auc += {-1: "; lower: the intervals do not overlap.", 1: "; higher: the intervals do not overlap.",
            0: "; the intervals overlap, so no difference is shown."}[gap(site, internal)]
    prevalence = (f"The share of {positive} is {fmt(site['prevalence'][positive])} at {name} against "
                  f"{fmt(round(development, 4))} in development.")
    citl = with_ci(calib, "citl")
    large = {1: f"the model under-predicts {positive} at {name} (observed minus mean predicted {citl})",
             -1: f"the model over-predicts {positive} at {name} (observed minus mean predicted {citl})",
             0: f"no miscalibration in the large is shown (observed minus mean predicted {citl}, the interval "
                "includes 0)"}[excludes(calib, "citl", 0.0)]
    slope = {-1: f"the probabilities are too extreme there (calibration slope {with_ci(calib, 'slope')}, below 1)",
             1: f"the probabilities are too timid there (calibration slope {with_ci(calib, 'slope')}, above 1)",
             0: f"the calibration slope {with_ci(calib, 'slope')} is consistent with 1"}[excludes(calib, "slope", 1.0)]
    return [auc, prevalence, f"Calibration at {name}: {large}; {slope}."]


def heterogeneity_sentence(spread: dict[str, Any] | None, sites: int) -> str:
    if spread is None:
        return ("No heterogeneity measure: fewer than two estimates (the internal test split and the sites) have a "
                "ROC AUC interval.")
    numbers = (f"Cochran's Q {fmt(spread['q'])} on {spread['df']} degrees of freedom, p {fmt(spread['p_value'])}, "
               f"I² {fmt(round(100 * spread['i2'], 1))}%; inverse-variance pooled ROC AUC {fmt(spread['pooled'])}")
    verdict = ("the ROC AUCs differ between them more than chance explains" if spread["p_value"] < 0.05 else
               f"no heterogeneity beyond chance is shown (a test of {spread['df'] + 1} estimates has little power)")
    return f"Across the internal test split and {sites} external site(s): {verdict} ({numbers})."


def context(records: dict[str, Any], figure: str | None) -> dict[str, Any]:
    """The report's external validation section; empty when the run had none."""
    found = records["eval"].get("external")
    if not found:
        return {}
    ev, data = records["eval"], records["data"]
    internal = ev["test"]
    positive = data["class_names"][records["package"]["positive_class"]]
    development = development_prevalence(data, positive)
    sites = found["sites"]
    header = ["site", "images", f"share of {positive}", *[f"{k.replace('_', ' ').replace('roc auc', 'ROC AUC')} "
                                                          "(95% CI)" for k in HEADLINE],
              "calibration-in-the-large (95% CI)", "calibration slope (95% CI)", "flagged out of distribution",
              "decisions unchanged under mild corruptions"]
    after = ev["calibration"]["after"]
    rows = [[INTERNAL, internal["n"], data["splits"]["test"]["prevalence"][positive],
             *[with_ci(internal, k) for k in HEADLINE], "n/a", with_ci(after, "slope"),
             fmt(round(ev["out_of_distribution"]["test_flagged"] / internal["n"], 4)), "n/a"]]
    rows += [[name, s["n"], s["prevalence"][positive], *[with_ci(s["test"], k) for k in HEADLINE],
              with_ci(s["calibration"], "citl"), with_ci(s["calibration"], "slope"), s["out_of_distribution"],
              fmt(s["decision_stability"].get("mean"))] for name, s in sites.items()]
    recalibrated = [[name, r["fitted_on"], r["scored_on"], fmt(r["temperature"]), fmt(r["threshold"]),
                     *[with_ci(r[which], k) for which in ("untouched", "recalibrated") for k in RECALIBRATED]]
                    for name, s in sites.items() if (r := s.get("recalibrated"))]
    return {
        "intro": (f"{len(sites)} external site(s), prepared with the development data's preprocessing and checks and "
                  f"scored once by the frozen model (threshold rule {internal['threshold_rule']}); no site was used "
                  "for training or for any choice. The internal test split is the first row, for reference."),
        "header": header, "rows": rows,
        "sentences": [line for name, s in sites.items()
                      for line in site_sentences(name, s, internal, positive, development)],
        "heterogeneity": heterogeneity_sentence(found["heterogeneity"]["roc_auc"], len(sites)),
        "figure": figure,
        "recalibrated": recalibrated,
        "recalibrated_header": ["site", "fitted on", "scored on", "temperature", "threshold",
                                *[f"{k} ({which})" for which in ("untouched", "recalibrated") for k in RECALIBRATED]],
    }
