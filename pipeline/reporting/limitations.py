"""The report's limitations, found in the run's own records by explicit rules.

Each rule reads one record (the data summary, train, evaluate or explain metrics) and, when its
condition holds, returns one sentence with the numbers behind it; nothing is listed because it
usually applies. The rules run most serious first, and a test builds, for each rule, records
where it must fire and records where it must not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.core.files import fmt
from pipeline.reporting.external import apart, excludes, gap, with_ci

CI_WIDTH_LIMIT = 0.1  # ROC AUC interval wider than this: too few test images to say much
ECE_LIMIT = 0.1
PREVALENCE_SHIFT_LIMIT = 0.05
# A corruption at some severity costs more than this: the model is fragile to it.
AUC_DROP_LIMIT = 0.05
ACCURACY_DROP_LIMIT = 0.10

Rule = Callable[[dict[str, Any]], list[str]]


def simulated(records: dict[str, Any]) -> list[str]:
    if records["data"]["input"]["source"] != "phantom":
        return []
    return ["Trained and tested on simulated phantom scans: a demonstration of the pipeline, which says nothing about "
            "performance on real patients."]


def did_not_learn(records: dict[str, Any]) -> list[str]:
    train = records["train"]
    if "per_fold" in train:  # cv.folds: each fold model's own checks
        return [sentence.replace("Training did not learn", f"Fold {n}: training did not learn")
                .replace("Validation never beat", f"Fold {n}: validation never beat")
                for n, fold in train["per_fold"].items()
                for sentence in did_not_learn({"train": {**fold, "chance_loss": train["chance_loss"]}})]
    found = []
    if train.get("left_chance") is False:
        found.append(f"Training did not learn: the training loss never left chance (lowest {fmt(train['min_train_loss'])} "
                     f"against {fmt(train['chance_loss'])} for uniform predictions); this run's metrics describe a "
                     "model that has not learned the task.")
    if train.get("improved_after_first_epoch") is False:
        found.append(f"Validation never beat the first epoch: of {train['epochs_run']} epochs, early stopping kept "
                     "epoch 1's weights.")
    return found


def failed_data_checks(records: dict[str, Any]) -> list[str]:
    checks = records["data"].get("checks", {})
    return [f"Data check failed: {check.replace('_', ' ')} = {checks[check]}."
            for check in ("patient_overlap", "duplicates_across_splits") if checks.get(check)]


def weak_pseudonyms(records: dict[str, Any]) -> list[str]:
    if records["data"].get("identifiers", {}).get("salt") != "empty":
        return []
    return ["Image ids are hashes of the file paths with an empty salt: anyone holding the files can recompute which "
            "file an id names. Set MEDCNN_PSEUDONYM_SALT to a secret before sharing outputs."]


def small_test_set(records: dict[str, Any]) -> list[str]:
    test = records["eval"]["test"]
    low, high = test.get("roc_auc_ci_low"), test.get("roc_auc_ci_high")
    if low is None or high - low <= CI_WIDTH_LIMIT:
        return []
    return [f"Small test set: the 95% CI of ROC AUC is {high - low:.3f} wide (> {CI_WIDTH_LIMIT}), from "
            f"{test['n']} test images."]


def subgroup_gaps(records: dict[str, Any]) -> list[str]:
    """Two subgroups whose ROC AUC intervals do not overlap."""
    found = []
    for group, rows in records["eval"].get("subgroups", {}).items():
        ranked = sorted(((name, m) for name, m in rows.items() if m.get("roc_auc_ci_low") is not None),
                        key=lambda item: item[1]["roc_auc"])
        if len(ranked) >= 2:
            (worst, w), (best, b) = ranked[0], ranked[-1]
            if apart(w, b) < 0:
                found.append(f"Subgroup gap by {group}: ROC AUC {fmt(w['roc_auc'])} for {worst} (95% CI "
                             f"{fmt(w['roc_auc_ci_low'])}–{fmt(w['roc_auc_ci_high'])}) against {fmt(b['roc_auc'])} for "
                             f"{best} ({fmt(b['roc_auc_ci_low'])}–{fmt(b['roc_auc_ci_high'])}): the intervals do not "
                             "overlap.")
    return found


def poor_calibration(records: dict[str, Any]) -> list[str]:
    calib = records["eval"]["calibration"]
    if calib["after"]["ece"] <= ECE_LIMIT:
        return []
    return [f"Poor calibration: ECE {fmt(calib['after']['ece'])} (> {ECE_LIMIT}) after {calib['method']} calibration; "
            "predicted probabilities should not be read as risks."]


def prevalence_shift(records: dict[str, Any]) -> list[str]:
    data = records["data"]
    prevalences = [split["prevalence"] for split in data["splits"].values()]
    shift = max(max(p[c] for p in prevalences) - min(p[c] for p in prevalences) for c in data["class_names"])
    if shift <= PREVALENCE_SHIFT_LIMIT:
        return []
    return [f"Class prevalence differs between splits by up to {shift:.3f}; PPV and NPV do not transfer."]


def out_of_distribution(records: dict[str, Any]) -> list[str]:
    flagged = records["eval"].get("out_of_distribution", {}).get("test_flagged", 0)
    if not flagged:
        return []
    return [f"{flagged} test image(s) fall outside the training images' intensity range (the model package's "
            "out-of-distribution flag; column out_of_distribution of reports/eval/predictions.csv): their scores are "
            "the least reliable."]


def fragile(records: dict[str, Any]) -> list[str]:
    """The corruptions whose worst severity costs more ROC AUC, or accuracy, than the limits allow:
    one sentence per metric, naming each corruption with its worst value."""
    robustness = records["eval"]["robustness"]
    clean = robustness["clean"]
    found = []
    for key, label, limit in (("roc_auc", "ROC AUC", AUC_DROP_LIMIT), ("accuracy", "accuracy", ACCURACY_DROP_LIMIT)):
        if clean[key] is None:
            continue
        hits = []
        for name, levels in robustness["corruptions"].items():
            scored = [(row[key], severity) for severity, row in levels.items() if row[key] is not None]
            if scored and clean[key] - min(scored)[0] > limit:
                worst, severity = min(scored)
                hits.append(f"{name.replace('_', ' ')} (to {fmt(worst)} at severity {severity})")
        if hits:
            found.append(f"Fragile under image corruptions: {label} falls by more than {limit} from its clean "
                         f"{fmt(clean[key])} under {', '.join(hits)}; scans from other scanners or settings may fare "
                         "worse than the test split.")
    return found


def untrustworthy_explanations(records: dict[str, Any]) -> list[str]:
    trust = records["explain_metrics"]["explain"]
    found = []
    failed_sanity = [m for m, row in trust.items() if not row["sanity_pass"]]
    if failed_sanity:
        found.append(f"Explanations that fail the randomisation sanity check (they do not depend on what the model "
                     f"learned): {', '.join(failed_sanity)}.")
    failed_place = [m for m, row in trust.items() if row.get("localisation_pass") is False]
    if failed_place:
        found.append(f"Explanations that do not point at the lesions more often than chance: {', '.join(failed_place)}.")
    found += [w for w in records["explain_metrics"]["warnings"] if w.startswith("Shortcut")]
    return found


def membership_leakage(records: dict[str, Any]) -> list[str]:
    audit = records["eval"]["privacy_audit"]
    if "not_run" in audit:
        return [f"No membership audit: {audit['not_run']}; how much the model leaks about its training images is "
                "unmeasured."]
    for attack in audit["attacks"].values():
        if (attack["roc_auc_ci_low"] or 0) > 0.5:
            return [f"Membership leakage: an attack tells training images from unseen ones (ROC AUC "
                    f"{fmt(attack['roc_auc'])}, 95% CI from {fmt(attack['roc_auc_ci_low'])})."]
    return []


def validation_reuse(records: dict[str, Any]) -> list[str]:
    val = records["eval"]["val"]
    uses = val.get("used_for", [])
    if len(uses) < 2:
        return []
    what = (f"The out-of-fold predictions ({val['n']} development images)" if "cross_validation" in records["eval"]
            else f"One validation split ({val['n']} images)")
    return [f"{what} served {len(uses)} purposes: {'; '.join(uses)}. Numbers measured on them are optimistic; only "
            "the test split was never used for a choice."]


def synthetic_images(records: dict[str, Any]) -> list[str]:
    n = records["balance"]["synthetic_images"]
    return [f"SMOTE added {n} synthetic (blended) training images."] if n else []


def did_not_transport(records: dict[str, Any]) -> list[str]:
    """An external site that shares images with the development data, whose ROC AUC interval lies
    wholly below the internal test split's, at which calibration-in-the-large excludes 0 (the
    model's risks are off there on average) or whose calibration slope interval excludes 1."""
    internal, found = records["eval"]["test"], []
    for name, site in records["eval"].get("external", {}).get("sites", {}).items():
        if site.get("in_development"):
            found.append(f"External site {name} is not wholly external: {site['in_development']} of its {site['n']} "
                         "images are exact copies of development images.")
        if gap(site, internal) < 0:
            found.append(f"Performance did not transport to {name}: ROC AUC {with_ci(site['test'], 'roc_auc')} there "
                         f"against {with_ci(internal, 'roc_auc')} on the internal test split.")
        if excludes(site["calibration"], "citl", 0.0):
            found.append(f"Miscalibrated at {name}: observed minus mean predicted risk "
                         f"{with_ci(site['calibration'], 'citl')}; recalibrate before using its probabilities there.")
        spread = excludes(site["calibration"], "slope", 1.0)
        if spread:
            found.append(f"Probabilities too {'extreme' if spread < 0 else 'timid'} at {name}: calibration slope "
                         f"{with_ci(site['calibration'], 'slope')}; its risks should not be read as such there.")
    return found


def single_source(records: dict[str, Any]) -> list[str]:
    if records["eval"].get("external"):
        return []
    return ["No external test set: all splits come from one source, so performance at other sites is unknown "
            "(evaluate.external adds sites)."]


RULES: tuple[Rule, ...] = (simulated, did_not_learn, failed_data_checks, weak_pseudonyms, small_test_set, subgroup_gaps,
                           poor_calibration, prevalence_shift, out_of_distribution, fragile,
                           untrustworthy_explanations, membership_leakage, validation_reuse, synthetic_images,
                           did_not_transport, single_source)


def limitations(records: dict[str, Any]) -> list[str]:
    """Every rule's sentences, most serious first."""
    return [sentence for rule in RULES for sentence in rule(records)]
