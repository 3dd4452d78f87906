"""Every fact sentence of the report follows the run's records: each test builds the records of a
run where the sentence must change (or must appear, or must not), and reads the text."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from pipeline import report
from pipeline.reporting import content, effective
from pipeline.reporting.limitations import RULES, limitations


@pytest.fixture
def records(tiny_run):
    return content.load_records(tiny_run[0])


def changed(records, **paths):
    """A deep copy of ``records`` with values set at dotted paths (``eval.test.n=5``)."""
    out = copy.deepcopy(records)
    for dotted, value in paths.items():
        *parents, key = dotted.split("__")
        node = out
        for part in parents:
            node = node[part]
        node[key] = value
    return out


def page_of(tiny_run, tmp_path, params=None, mutate=None):
    """The rendered report of the tiny run, its records first changed by ``mutate``."""
    root, run_params = tiny_run
    records = content.load_records(root)
    if mutate:
        mutate(records)
    context = content.context(params or run_params, root, records)
    return report.render("report.html.j2", context), report.render("model_card.md.j2", context)


# --- limitations: each rule fires on a run that has the problem and stays silent otherwise --------

def test_every_rule_is_silent_on_a_clean_run(records):
    clean = changed(records, data__input={"source": "npz", "path": "x.npz"})
    clean["train"].update(left_chance=True, improved_after_first_epoch=True)
    clean["eval"]["test"].update(roc_auc_ci_low=0.90, roc_auc_ci_high=0.95)
    clean["eval"]["calibration"]["after"]["ece"] = 0.01
    clean["eval"]["subgroups"] = {}
    clean["eval"]["out_of_distribution"]["test_flagged"] = 0
    clean["eval"]["robustness"]["corruptions"] = {}
    clean["eval"]["val"]["used_for"] = ["choosing the training epoch (early stopping)"]
    for row in clean["explain_metrics"]["explain"].values():
        row.update(sanity_pass=True, localisation_pass=True)
    clean["explain_metrics"]["warnings"] = []
    for attack in clean["eval"]["privacy_audit"]["attacks"].values():
        attack["roc_auc_ci_low"] = 0.45
    site = clean["eval"]["external"]["sites"]["site_c"]
    site["test"].update(roc_auc_ci_low=0.85, roc_auc_ci_high=0.93)
    site["calibration"].update(citl_ci_low=-0.05, citl_ci_high=0.04, slope_ci_low=0.8, slope_ci_high=1.2)
    assert limitations(clean) == []
    del clean["eval"]["external"]  # no site: the one limitation no run without one can escape
    assert limitations(clean) == ["No external test set: all splits come from one source, so performance at other "
                                  "sites is unknown (evaluate.external adds sites)."]


def test_external_sentences_follow_the_site_records(tiny_run, tmp_path, records):
    from pipeline.reporting import external

    internal = changed(records)["eval"]["test"]
    internal.update(roc_auc=0.95, roc_auc_ci_low=0.92, roc_auc_ci_high=0.97)
    site = copy.deepcopy(records["eval"]["external"]["sites"]["site_c"])
    site["test"].update(roc_auc=0.80, roc_auc_ci_low=0.72, roc_auc_ci_high=0.87)
    site["calibration"].update(citl=0.09, citl_ci_low=0.03, citl_ci_high=0.15, slope=0.6, slope_ci_low=0.4,
                               slope_ci_high=0.8)
    said = external.site_sentences("site_c", site, internal, "lesion", 0.2)
    assert said[0] == (f"site_c: ROC AUC 0.8 (0.72–0.87) on {site['n']} images against 0.95 (0.92–0.97) on the "
                       "internal test split; lower: the intervals do not overlap.")
    assert said[1] == f"The share of lesion is {content.fmt(site['prevalence']['lesion'])} at site_c against 0.2 in development."
    assert said[2] == ("Calibration at site_c: the model under-predicts lesion at site_c (observed minus mean predicted "
                       "0.09 (0.03–0.15)); the probabilities are too extreme there (calibration slope 0.6 (0.4–0.8), "
                       "below 1).")
    site["test"].update(roc_auc_ci_low=0.5, roc_auc_ci_high=0.99)
    site["calibration"].update(citl_ci_low=-0.01, slope_ci_high=1.3)
    said = external.site_sentences("site_c", site, internal, "lesion", 0.2)
    assert said[0].endswith("the intervals overlap, so no difference is shown.")
    assert "no miscalibration in the large is shown" in said[2] and "(0.4–1.3) is consistent with 1" in said[2]
    # the limitations name what did not transport, and only that
    bad = changed(records)
    bad["eval"]["test"].update(internal)
    bad["eval"]["external"]["sites"]["site_c"] = {**site, "test": {**site["test"], "roc_auc_ci_high": 0.87},
                                                  "calibration": {**site["calibration"], "citl_ci_low": 0.03},
                                                  "in_development": 3}
    found = [s for s in limitations(bad) if "site_c" in s]
    assert found == [f"External site site_c is not wholly external: 3 of its {site['n']} images are exact copies of "
                     "development images.",
                     "Performance did not transport to site_c: ROC AUC 0.8 (0.5–0.87) there against 0.95 (0.92–0.97) "
                     "on the internal test split.",
                     "Miscalibrated at site_c: observed minus mean predicted risk 0.09 (0.03–0.15); recalibrate before "
                     "using its probabilities there."]
    extreme = changed(bad)
    extreme["eval"]["external"]["sites"]["site_c"]["calibration"].update(slope=0.37, slope_ci_low=0.3,
                                                                        slope_ci_high=0.46)
    assert ("Probabilities too extreme at site_c: calibration slope 0.37 (0.3–0.46); its risks should not be read as "
            "such there.") in limitations(extreme)
    spread = {"q": 9.1, "df": 2, "p_value": 0.0106, "i2": 0.78, "pooled": 0.88, "sites": ["a", "b", "c"]}
    assert external.heterogeneity_sentence(spread, 2) == (
        "Across the internal test split and 2 external site(s): the ROC AUCs differ between them more than chance "
        "explains (Cochran's Q 9.1 on 2 degrees of freedom, p 0.0106, I² 78%; inverse-variance pooled ROC AUC 0.88).")
    assert "no heterogeneity beyond chance is shown" in external.heterogeneity_sentence({**spread, "p_value": 0.3}, 2)
    # the rendered page: the section, the table's site row, the heterogeneity sentence from the records
    page, _ = page_of(tiny_run, tmp_path)
    section = page[page.index("<h3>External validation</h3>"):page.index('<section id="failures">')]
    assert "<td>site_c</td>" in section and "forest plot of ROC AUC by site" in section
    assert external.heterogeneity_sentence(records["eval"]["external"]["heterogeneity"]["roc_auc"], 1) \
        .replace("'", "&#39;") in section
    assert "Recalibrated on part of each site" in section
    without, card_without = page_of(tiny_run, tmp_path, mutate=lambda r: r["eval"].pop("external"))
    assert "<h3>External validation</h3>" not in without and "No external test set" in without
    # the model card: the site among the evaluation data, its row among the analyses; or that there is none
    _, card = page_of(tiny_run, tmp_path)
    site_c = records["eval"]["external"]["sites"]["site_c"]
    assert f"(site_c: {site_c['n']} images)" in card
    assert (f"| site_c | {site_c['n']} | {content.fmt(site_c['test']['roc_auc'])} | "
            f"{content.fmt_ci(site_c['test'], 'roc_auc')} | {content.fmt(site_c['calibration']['slope'])} |") in card
    assert "No external validation set: performance at other sites is unknown." in card_without
    assert "external site" not in card_without


def test_training_that_never_left_chance_is_a_limitation(records):
    stuck = changed(records, train__left_chance=False, train__min_train_loss=0.6931, train__chance_loss=0.6931)
    assert any(s.startswith("Training did not learn: the training loss never left chance (lowest 0.6931 against "
                            "0.6931") for s in limitations(stuck))
    assert not any(s.startswith("Training did not learn") for s in limitations(changed(records, train__left_chance=True)))
    first = changed(records, train__improved_after_first_epoch=False, train__epochs_run=6)
    assert "Validation never beat the first epoch: of 6 epochs, early stopping kept epoch 1's weights." in limitations(first)


def test_a_subgroup_gap_is_named_when_the_intervals_do_not_overlap(records):
    gap = changed(records)
    gap["eval"]["subgroups"] = {"site": {
        "site-A": {"roc_auc": 0.968, "roc_auc_ci_low": 0.94, "roc_auc_ci_high": 0.99},
        "site-B": {"roc_auc": 0.917, "roc_auc_ci_low": 0.88, "roc_auc_ci_high": 0.935}}}
    assert ("Subgroup gap by site: ROC AUC 0.917 for site-B (95% CI 0.88–0.935) against 0.968 for site-A "
            "(0.94–0.99): the intervals do not overlap.") in limitations(gap)
    gap["eval"]["subgroups"]["site"]["site-B"]["roc_auc_ci_high"] = 0.95
    assert not any(s.startswith("Subgroup gap") for s in limitations(gap))


def test_a_corruption_that_costs_accuracy_is_named_with_its_worst_severity(records):
    fragile = changed(records)
    robustness = fragile["eval"]["robustness"]
    robustness["clean"] = {"roc_auc": 0.96, "accuracy": 0.92}
    robustness["corruptions"] = {"brightness": {"1": {"roc_auc": 0.95, "accuracy": 0.41},
                                                "3": {"roc_auc": 0.94, "accuracy": 0.2}},
                                 "jpeg": {"1": {"roc_auc": 0.95, "accuracy": 0.9}}}
    found = [s for s in limitations(fragile) if s.startswith("Fragile")]
    assert found == ["Fragile under image corruptions: accuracy falls by more than 0.1 from its clean 0.92 under "
                     "brightness (to 0.2 at severity 3); scans from other scanners or settings may fare worse than "
                     "the test split."]


def test_out_of_distribution_test_images_and_validation_reuse_are_stated(records):
    flagged = changed(records)
    flagged["eval"]["out_of_distribution"]["test_flagged"] = 1
    assert any(s.startswith("1 test image(s) fall outside the training images' intensity range")
               for s in limitations(flagged))
    uses = records["eval"]["val"]["used_for"]
    sentence = next(s for s in limitations(records) if s.startswith("One validation split"))
    assert f"served {len(uses)} purposes" in sentence and "the membership audit's non-members" in sentence


def test_explanation_methods_that_fail_are_listed(records):
    failing = changed(records)
    rows = failing["explain_metrics"]["explain"]
    for name, row in rows.items():
        row.update(sanity_pass=name != "lime", localisation_pass=name not in ("grad_cam", "occlusion"))
    found = limitations(failing)
    assert "Explanations that fail the randomisation sanity check (they do not depend on what the model learned): " \
           "lime." in found
    assert "Explanations that do not point at the lesions more often than chance: grad_cam, occlusion." in found


def test_an_empty_salt_is_a_limitation_only_where_ids_are_hashed(records):
    assert not any("empty salt" in s for s in limitations(records))  # the phantom hashes nothing
    hashed = changed(records)
    hashed["data"]["identifiers"] = {"images": "salted SHA-256 pseudonyms of the file paths", "patients": None,
                                     "salt": "empty"}
    assert any(s.startswith("Image ids are hashes of the file paths with an empty salt") for s in limitations(hashed))


def test_rules_are_functions_of_the_records_alone(records):
    for rule in RULES:
        assert rule(copy.deepcopy(records)) == rule(records), rule.__name__


# --- explanations: what was explained, at which decision, and the verdicts ----------------------------

def test_sample_sentence_counts_what_was_drawn(records):
    explain = changed(records)["explain"]
    explain["samples"] = [{"why": w} for w in ("true positive", "true positive", "false negative", "true negative",
                                                "most confident false positive")]
    explain["settings"].update(per_outcome=2, worst=1)
    explain["outcomes_available"] = {"true positive": 9, "false negative": 1, "true negative": 50,
                                     "false positive": 0}
    assert content.sample_text(explain) == (
        "5 test images explained: 2 true positives, 1 false negative, 1 true negative, 1 most confident false "
        "positive (explain.per_outcome 2, explain.worst 1). The test split has no false positive.")


def test_decision_sentence_names_the_frozen_threshold_or_argmax(records):
    decision = records["explain"]["decision"]
    text = content.decision_sentence(decision)
    assert f"against the threshold {content.fmt(decision['threshold'])} frozen on validation" in text
    assert "P(lesion) after temperature" in text and "lesion at or above it, else normal" in text
    assert "the class with the highest probability" in content.decision_sentence({"rule": "argmax", "temperature": 1.0})


def test_verdicts_show_the_numbers_and_the_rule(records):
    row = {"randomised_all_layers_spearman": 0.5034, "sanity_pass": False, "deletion_auc": 0.50071,
           "deletion_beats_random": False, "insertion_auc": 0.8, "insertion_beats_random": True, "faithful": True,
           "localisation_pass": False, "pointing_game": 0.0, "pointing_game_ci_low": 0.0, "pointing_game_ci_high": 0.0,
           "pointing_game_chance": 0.0272}
    sanity, faithful, place = content.verdicts(row, {"deletion_auc": 0.50068, "insertion_auc": 0.6}, 0.5)
    assert sanity == "FAIL: Spearman 0.5034 > 0.5"
    assert faithful == "pass: deletion 0.50071 ≥ 0.50068, insertion 0.8 > 0.6 (random order)"
    assert place == "FAIL: pointing game 0 (95% CI 0–0) not above chance 0.0272"
    row.update(localisation_pass=None)
    assert content.verdicts(row, {"deletion_auc": 0.6, "insertion_auc": 0.6}, 0.5)[2] == \
        "not applicable: no lesion masks"


def test_rendered_explanations_state_the_decision_and_localisation(tiny_run, tmp_path):
    page, _ = page_of(tiny_run, tmp_path)
    section = page[page.index('<section id="explanations">'):page.index('<section id="privacy">')]
    assert "Each map explains the model&#39;s decision" in section and "predicted class" not in section
    assert "Localisation: the maps of lesion for 16 test images with a lesion mask" in section
    assert "<th>sanity check</th><th>faithfulness</th><th>localisation</th>" in section


# --- data, model, results -------------------------------------------------------------------------------

def test_patient_overlap_with_no_patient_ids_is_not_applicable(records):
    rows = dict(content.check_rows(records["data"]))
    assert rows["patient_overlap"].startswith("not applicable: no split carries patient ids")
    checked = changed(records)
    checked["data"]["checks"]["patient_overlap"] = 0
    assert dict(content.check_rows(checked["data"]))["patient_overlap"] == 0


def test_identifiers_sentence_follows_the_source(records):
    assert content.identifiers_text(records["data"]).startswith(
        "Images are identified by serial numbers given by the generator")
    assert "The data carry no patient ids." in content.identifiers_text(records["data"])
    files = {"identifiers": {"images": "salted SHA-256 pseudonyms of the file paths (img-<16 hex digits>)",
                             "patients": "salted SHA-256 pseudonyms of the patient ids (p-<16 hex digits>)",
                             "salt": "set"}}
    text = content.identifiers_text(files)
    assert "the salt is secret and never written" in text and "Patient ids are replaced by salted" in text


def test_model_card_claims_no_pseudonyms_the_run_did_not_make(tiny_run, tmp_path):
    _, card = page_of(tiny_run, tmp_path)
    assert "replaced by salted pseudonyms" not in card and "below" not in card
    assert "serial numbers given by the generator" in card


def test_intended_use_of_a_phantom_run_is_a_demonstration(tiny_run, records):
    _, params = tiny_run
    assert content.intended_use_text(params, records["data"]).startswith("This run is a demonstration on simulated "
                                                                          "phantom scans")
    npz = changed(records, data__input={"source": "npz", "path": "x.npz"})
    assert content.intended_use_text(params, npz["data"]) == params.report.intended_use


def test_determinism_sentence_states_the_recorded_scope(records):
    timing = records["train_timing"]
    text = content.determinism_text(timing)
    assert f"({timing['kernels']['threads']}) give the same bytes on any x86-64 CPU with AVX2" in text
    native = copy.deepcopy(timing)
    native["kernels"]["mode"] = "native"
    assert "CPUs with the same instruction sets as this one" in content.determinism_text(native)
    gpu = content.determinism_text({"device": "cuda (NVIDIA H200)", "precision": "bf16"})
    assert gpu.startswith("trained on cuda (NVIDIA H200) in bfloat16 autocast") and "not byte for byte" in gpu
    assert "no reproducibility scope" in content.determinism_text({"device": "cpu"})


def test_effective_params_say_what_ran(tiny_run, records):
    _, params = tiny_run
    notes = dict((k, n) for k, _, n in effective.rows(params, records))
    assert notes["train.precision"] == "not used: trained in float32 on cpu"
    assert notes["data.split.val"].startswith("not used: generated per split")
    assert notes["data.phantom.n_train"] == "" and notes["train.lr"] == ""
    assert notes["train.privacy.target_epsilon"] == "not used: train.privacy.enabled is false"
    skipped = changed(records)
    skipped["eval"]["baselines_skipped"] = {"svm": "1200 training images > evaluate.svm_max_train (1000)"}
    notes = dict((k, n) for k, _, n in effective.rows(params, skipped))
    assert notes["evaluate.baselines"] == ("ran: logistic_regression, random_forest, decision_tree; skipped: svm "
                                           "(1200 training images > evaluate.svm_max_train (1000))")
    npz = changed(records, data__input={"source": "npz", "path": "x.npz"},
                  data__split_method="grouped by patient and stratified by label")
    npz_params = dataclasses.replace(params, data=dataclasses.replace(params.data, source="npz", path="x.npz"))
    notes = dict((k, n) for k, _, n in effective.rows(npz_params, npz))
    assert notes["data.phantom.n_train"] == "not used: data.source is npz" and notes["data.split.val"] == ""


def test_lock_table_leaves_out_the_reports_own_and_tracks_outputs(tiny_run, records):
    root, params = tiny_run
    records = changed(records)
    records["dvc_lock"] = {"stages": {stage: {"outs": [{"path": f"{stage}.out", "md5": "0" * 32}]}
                                      for stage in ("train", "explain", "report", "track")}}
    lock = content.reproducibility_context(params, root, records)["lock"]
    assert [row[0] for row in lock] == ["train", "explain"]


def test_decision_curve_sentence(records):
    curve = records["eval"]["decision_curve"]
    text = content.decision_curve_text(curve, "lesion")
    assert f"at the frozen threshold {content.fmt(curve['operating_threshold'])}" in text
    none = {**curve, "useful_ranges": []}
    assert content.decision_curve_text(none, "lesion").endswith("at no threshold probability from 0.01 to 0.99.")
    two = {**curve, "useful_ranges": [[0.05, 0.3], [0.5, 0.5]]}
    assert content.decision_curve_text(two, "lesion").endswith("for threshold probabilities 0.05–0.3, 0.5.")
    assert content.decision_curve_text(None, "x").startswith("No decision curve: a multi-class model")


def test_results_show_precision_skipped_baselines_and_validation_use(tiny_run, tmp_path):
    def skip_svm(records):
        records["eval"]["baselines_skipped"] = {"svm": "200 training images > evaluate.svm_max_train (100)"}

    page, _ = page_of(tiny_run, tmp_path, mutate=skip_svm)
    section = page[page.index('<section id="results">'):page.index('<section id="failures">')]
    assert "svm was not fitted: 200 training images &gt; evaluate.svm_max_train (100)." in section
    assert "<td>sensitivity</td>" in section and "from n images" in section
    assert "reports/eval/val_predictions.csv" in section
    assert "Decision curve (test split, calibrated P(lesion))" in section


def test_paired_comparison_sentences_follow_the_tests(tiny_run, tmp_path, records):
    from pipeline.reporting import paired

    result = records["eval"]["comparisons"]["logistic_regression"]
    delong = result["delong"]
    # The records hold the CNN against the baseline on the same test images.
    assert result["n"] == records["eval"]["test"]["n"]
    assert delong["auc_b"] == pytest.approx(records["eval"]["test"]["roc_auc"], abs=1e-6)
    assert delong["auc_a"] == pytest.approx(records["eval"]["baselines"]["logistic_regression"]["roc_auc"], abs=1e-6)
    shown = {**result, "delong": {**delong, "difference": 0.05, "ci_low": 0.01, "ci_high": 0.09, "p_value": 0.0004}}
    assert paired.auc_sentence(shown, "A", "B") == ("ROC AUC: B's is higher than A's (" f"{content.fmt(delong['auc_b'])} "
                                                    f"against {content.fmt(delong['auc_a'])}, difference 0.05, 95% CI "
                                                    "0.01 to 0.09, DeLong p < 0.001).")
    unsure = {**result, "delong": {**delong, "difference": 0.02, "ci_low": -0.01, "ci_high": 0.05, "p_value": 0.21}}
    assert paired.auc_sentence(unsure, "A", "B").startswith("ROC AUC: no difference between B and A is shown")
    assert "DeLong p 0.210: the interval includes 0" in paired.auc_sentence(unsure, "A", "B")
    worse = {**result, "delong": {**delong, "difference": -0.05, "ci_low": -0.09, "ci_high": -0.01}}
    assert "B's is lower than A's" in paired.auc_sentence(worse, "A", "B")
    mc = {**result, "mcnemar": {"a_only": 3, "b_only": 14, "both": 50, "neither": 13, "p_value": 0.013,
                                "method": "exact binomial"}}
    assert paired.decision_sentence(mc, "A", "B").endswith("(McNemar, exact binomial, p 0.013); B decides more "
                                                           "images correctly.")
    mc["mcnemar"]["p_value"] = 0.2
    assert paired.decision_sentence(mc, "A", "B").endswith("neither decides significantly more correctly.")
    page, _ = page_of(tiny_run, tmp_path)
    section = page[page.index('<section id="results">'):page.index('<section id="failures">')]
    assert "CNN against each baseline, paired on the same test images" in section
    for sentence in paired.sentences(result, "logistic regression", "the CNN"):
        assert sentence.replace("'", "&#39;") in section
