"""What the report says, as plain data gathered from the run's own records.

Every sentence that states a fact about the run is built here from params, the data summary,
``balance.json``, the stage metrics or the model checkpoint, never written as a constant, so
a reviewer never reads a sentence the run contradicts; the templates in ``templates/`` only
lay the facts out. Each function takes the records (:func:`load_records`) and returns
strings, rows or mappings, so tests can flip one record and check that the sentence follows.
"""

from __future__ import annotations

import base64
import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml

from pipeline.core import kernels, paths
from pipeline.core.config import Params, TrainParams, effective_loss, effective_train, flatten
from pipeline.core.dataset import SPLITS
from pipeline.core.files import file_digest, fmt, read_csv, read_json
from pipeline.data import catalog
from pipeline.evaluation.metrics import COMPARISON, summary_keys
from pipeline.modeling.networks import MONAI_NETWORKS, WIDTH_NETWORKS

METRIC_NAMES = {"roc_auc_micro": "micro ROC AUC", "exact_match": "exact match (every finding right)",
                "kappa": "quadratic weighted kappa", "mae": "mean absolute error (grades)",
                "within_one": "accuracy within one grade"}
FINDING_METRICS = ("roc_auc", "average_precision", "sensitivity", "specificity")


# What the report calls things in each task (a run's data summary names its task; none: one
# class per image, as data prepared before tasks existed).
TASK_WORDS: dict[str | None, dict[str, str]] = {
    None: {"unit": "classes", "item": "class", "weight": "loss weight", "selection": "ROC AUC",
           "failures": "The test images the model got wrong with the most confidence (score: P(positive) for binary "
                       "tasks, else the predicted class's probability)."},
    "multilabel": {"unit": "findings", "item": "finding", "weight": "positive weight", "selection": "macro ROC AUC",
                   "class_weight": "positive weights per finding: images without it / images with it, among the "
                                   "training images where it was assessed (binary cross-entropy's pos_weight)",
                   "roc_auc": "macro ROC AUC", "accuracy": "accuracy (MedMNIST ACC: mean over findings at 0.5)",
                   "failures": "The findings the model called or missed with the most confidence, over every "
                               "(image, finding) pair (score: the calibrated P(finding))."},
    "ordinal": {"unit": "grades", "item": "grade", "weight": "loss weight", "selection": "quadratic weighted kappa",
                "roc_auc": "macro ROC AUC (one grade vs the rest)",
                "failures": "The worst-graded test images: farthest from the true grade first, then the most "
                            "confident (score: the calibrated probability of the decided grade)."},
}


def words(records: dict[str, Any]) -> dict[str, str]:
    task = records["data"].get("task")
    return {**TASK_WORDS[None], **TASK_WORDS.get(task if task in TASK_WORDS else None, {})}


def metric_name(key: str, records: dict[str, Any]) -> str:
    return words(records).get(key) or METRIC_NAMES.get(key, key)


def readable_metric(key: str, records: dict[str, Any]) -> str:
    """A metric's name in a table header: the task's word, else words for its key (ROC AUC)."""
    return words(records).get(key) or METRIC_NAMES.get(key) or {"roc_auc": "ROC AUC"}.get(key, key.replace("_", " "))


def finding_rows(ev: dict[str, Any], names: list[str]) -> list[list[Any]]:
    """Multi-label: [finding, assessed, present, each metric with its CI, threshold] per finding."""
    if ev.get("task") != "multilabel":
        return []
    found = ev["test"]["findings"]
    return [[name, found[name]["n"], found[name]["positives"],
             *[f"{fmt(found[name][m])} ({fmt_ci(found[name], m)})" for m in FINDING_METRICS], threshold]
            for name, threshold in zip(names, ev["test"]["threshold"])]
from pipeline.reporting import effective, external, folds, paired, search
from pipeline.reporting.limitations import limitations
from pipeline.reporting.provenance import git_state, versions

# Stages whose outputs the report cannot know of itself: its own, and the MLflow run logged after it.
AFTER_REPORT = ("report", "track")

# How each imbalance strategy (balance.strategy) changed the training split, in words.
STRATEGY_TEXT = {
    "none": "none: the training split is used as it is, every class with loss weight 1",
    "class_weight": "class weights: every training image used once; the loss weights each class by n / (K · n_class)",
    "oversample": "random oversampling (imblearn RandomOverSampler): minority-class images repeated until classes are equal",
    "undersample": "random undersampling (imblearn RandomUnderSampler): majority-class images dropped until classes are equal",
    "smote": "SMOTE (imblearn) on flattened pixels: synthetic minority images blended from neighbours",
}
SAMPLER_TEXT = {"none": "seeded shuffle, every image once per epoch",
                "weighted": "class-balanced draw with replacement (WeightedRandomSampler, weights 1/n_class)"}
SCHEDULE_TEXT = {"none": "constant learning rate", "cosine": "cosine annealing to 0",
                 "onecycle": "one-cycle (cosine annealing to lr/100 after the warm-up)"}
TRUST_COLUMNS = (("deletion_auc", "deletion AUC ↓"), ("insertion_auc", "insertion AUC ↑"), ("infidelity", "infidelity ↓"),
                 ("sensitivity_max", "max-sensitivity ↓"), ("randomised_top_layer_spearman", "Spearman, top layer random"),
                 ("randomised_all_layers_spearman", "Spearman, all layers random"),
                 ("randomised_all_layers_ssim", "SSIM, all layers random"), ("pointing_game", "pointing game ↑"),
                 ("mass_in_mask", "mass in lesion ↑"), ("auprc_mask", "AUPRC vs mask ↑"), ("marker_mass", "mass on marker"))


def fmt_ci(metrics: dict[str, Any], key: str) -> str:
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    return "n/a" if low is None or high is None else f"{fmt(low)} – {fmt(high)}"


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def load_records(root: Path) -> dict[str, Any]:
    """Every stage output the report reads, by name (paths as ``dvc.yaml`` declares them)."""
    from pipeline.modeling.package import load_package  # torch: only the model's own record needs it

    package = load_package(root / paths.MODEL)
    lock = root / paths.DVC_LOCK
    return {
        "data": read_json(root / paths.DATA_SUMMARY),
        "balance": read_json(root / paths.BALANCE_REPORT),
        "train": read_json(root / paths.TRAIN_DIR / paths.METRICS)["train"],
        "train_timing": read_json(root / paths.TRAIN_DIR / paths.TIMING),
        "history": read_csv(root / paths.TRAIN_DIR / paths.HISTORY),
        "eval": read_json(root / paths.EVAL_DIR / paths.METRICS),
        "eval_timing": read_json(root / paths.EVAL_DIR / paths.TIMING),
        "failures": read_json(root / paths.EVAL_DIR / paths.FAILURES),
        "explain": read_json(root / paths.EXPLAIN_DIR / paths.SAMPLES),
        "explain_metrics": read_json(root / paths.EXPLAIN_DIR / paths.METRICS),
        "model_config": dict(vars(package.network.config)),
        "package": package.state(),
        "model_sha256": file_digest(root / paths.MODEL),
        "dvc_lock": yaml.safe_load(lock.read_text()) if lock.is_file() else None,
    }


# --- facts, one function per topic ---------------------------------------------------------------

def source_text(data: dict[str, Any]) -> str:
    source = data["input"]
    known = catalog.lookup(source["source"], source.get("path"))
    where = known["name"] if known else source.get("path", source["source"])
    return f"data.source {source['source']}: {where}"


def inclusion_text(data: dict[str, Any]) -> str:
    n = sum(d["n"] for d in data["splits"].values())
    excluded = data.get("excluded", 0)
    dropped = data.get("checks", {}).get("duplicates_dropped", 0)
    parts = [f"{n} images prepared"]
    parts.append(f"{excluded} file(s) excluded as unreadable or not images (listed below)" if excluded
                 else "no file excluded")
    if dropped:
        parts.append(f"{dropped} exact duplicate image(s) dropped")
    return "Inclusion: " + "; ".join(parts) + "."


def split_text(data: dict[str, Any]) -> str:
    return f"Split: {data['split_method']}."


def resize_text(data: dict[str, Any]) -> str:
    pre = data.get("preprocessing", {})
    size = "×".join(map(str, data["image_size"]))
    originals = ", ".join(f"{k} ({v})" for k, v in pre.get("original_sizes", {}).items()) or "unknown"
    if pre.get("image_size") is None:
        return f"Size: images kept at their stored size ({size}); no resizing."
    if pre.get("resized"):
        return (f"Size: {pre['resized']} image(s) centre-cropped to a square and resized (bilinear) to {size}; "
                f"stored sizes: {originals}.")
    return f"Size: data.image_size is {size} and every image already had that size; none was resized."


def channels_text(data: dict[str, Any]) -> str:
    pre, channels = data.get("preprocessing", {}), data["channels"]
    if pre.get("channels_converted"):
        how = "RGB to grayscale (ITU-R 601 luma)" if channels == 1 else "grayscale copied to 3 channels"
        return f"Channels: {pre['channels_converted']} image(s) converted, {how}; {channels} channel(s) in the model."
    return f"Channels: {channels}, as stored; no conversion."


def dicom_text(data: dict[str, Any]) -> str | None:
    if not data.get("dicom"):
        return None
    dicom = data.get("preprocessing", {}).get("dicom", {})
    center, width = dicom.get("window_center"), dicom.get("window_width")
    voi = (f"the window given in data.dicom (center {center}, width {width})" if center is not None and width is not None
           else "each file's own VOI LUT or window (else its min..max)")
    return (f"DICOM ({', '.join(data['dicom'])}): modality LUT (rescale), then {voi}, mapped to 0..255; "
            "MONOCHROME1 inverted.")


def standardisation_text(config: dict[str, Any]) -> str:
    return (f"Intensities: stored as uint8, scaled to [0, 1], then standardised inside the model with the "
            f"training split's mean {fmt(config['mean'])} and standard deviation {fmt(config['std'])}.")


def augmentation_text(cfg: TrainParams) -> str:
    parts = [f"{label}{value}{unit}" for label, value, unit in (
        ("rotation ±", cfg.aug_rotate, "°"), ("shift ±", cfg.aug_translate, " of the side"), ("zoom ±", cfg.aug_scale, ""),
        ("brightness/contrast ±", cfg.aug_intensity, "")) if value]
    if cfg.aug_flip:
        parts.append("horizontal flips")
    return "seeded: " + ", ".join(parts) if parts else "none"


def preprocessing_facts(params: Params, records: dict[str, Any]) -> list[str]:
    data = records["data"]
    facts = [resize_text(data), channels_text(data), dicom_text(data), standardisation_text(records["model_config"]),
             f"Training augmentation: {augmentation_text(params.train)} (validation and test images are never "
             "augmented)."]
    return [f for f in facts if f]


def imbalance_text(balance: dict[str, Any], said: dict[str, str]) -> str:
    text = said.get(balance["strategy"], STRATEGY_TEXT[balance["strategy"]])
    return f"Imbalance handling: {text}; applied to the training split only."


def loss_text(cfg: TrainParams, task: str | None) -> str:
    cfg = dataclasses.replace(cfg, loss=effective_loss(cfg.loss, task))
    if task == "multilabel":
        return ("binary cross-entropy per finding with the balance stage's positive weights; findings not assessed "
                "(-1) left out of the loss")
    if cfg.loss == "corn":
        return ("CORN (conditional ordinal regression): output k is the logit of P(grade > k | grade ≥ k), trained on "
                "the images of grade ≥ k, weighted by the balance stage's grade weights")
    loss = f"focal (gamma {cfg.focal_gamma})" if cfg.loss == "focal" else "cross-entropy"
    return (loss + " with the balance stage's class weights"
            + (f", label smoothing {cfg.label_smoothing}" if cfg.label_smoothing else ""))


def schedule_text(cfg: TrainParams) -> str:
    return (SCHEDULE_TEXT[cfg.schedule] + (f", after {cfg.warmup_epochs} linear warm-up epoch(s)" if cfg.warmup_epochs else "")
            + (f"; gradient norm clipped at {cfg.grad_clip}" if cfg.grad_clip else ""))


def determinism_text(timing: dict[str, Any]) -> str:
    """What a rerun reproduces, from what the training recorded (device, kernels, threads)."""
    device, found = timing.get("device", "cpu"), timing.get("kernels")
    if device != "cpu":
        precision = "bfloat16 autocast" if timing.get("precision") == "bf16" else "float32"
        return (f"trained on {device} in {precision}: GPU kernels are not bit-reproducible, so reruns agree closely "
                "but not byte for byte; with train.device: cpu the bytes repeat")
    if not found:
        return "trained on the CPU; the run did not record which kernels it used, so no reproducibility scope is stated"
    return (f"trained on the CPU ({found['cpu']}) in float32 with {found['mode']} kernels: the same params, seed, "
            f"requirements.lock and thread count ({found.get('threads')}) give the same bytes on {kernels.scope(found)}")


def initialisation_text(name: str, weights: dict[str, Any] | None) -> str:
    """How the weights started: random (whose scheme), or which tensors came from which file."""
    random = ("MONAI's initialisation of the network" if name in MONAI_NETWORKS
              else "PyTorch defaults (Kaiming-uniform)") + ", drawn from the run's seed"
    if not weights:
        return random
    left = weights["tensors"] - weights["loaded"]
    return (f"pretrained weights {weights['file']} (sha256 {weights['sha256']}), pretrained on "
            f"{weights['source'] or 'data the run does not state (train.pretrained.source is empty)'}: "
            f"{weights['loaded']} of {weights['tensors']} tensors loaded"
            + (f"; the other {left} ({', '.join(weights['not_loaded'][:4])}{', …' if left > 4 else ''}) from "
               + random if left else ""))


def model_rows(params: Params, records: dict[str, Any]) -> list[list[Any]]:
    train, cfg = records["train"], effective_train(params.train, records["data"].get("task"))
    optimizer = f"{cfg.optimizer} (lr {cfg.lr}, weight decay {cfg.weight_decay}" + (
        f", momentum {cfg.momentum})" if cfg.optimizer == "sgd" else ")")
    config = records["model_config"]
    said = words(records)
    members = f"ensemble of {train['folds']} fold models, each " if "folds" in train else ""
    width = f" (width {config['width']})" if config["name"] in WIDTH_NETWORKS else ""
    return [["architecture", members + config["name"] + width + (" (MONAI)" if config["name"] in MONAI_NETWORKS else "")],
            ["input", (f"{config['image_size']} px" if config.get("ndim", 2) == 2 else
                       f"{config['image_size']}³ voxels (volumes, 3-D layers)")
             + f", {config['in_channels']} channel(s), {len(records['data']['class_names'])} {said['unit']}"
            + (f" ({config['num_classes']} outputs)" if config["num_classes"] != len(records["data"]["class_names"])
               else "")],
            ["parameters", train["parameters"]],
            ["initialisation", initialisation_text(config["name"], train.get("pretrained"))],
            ["optimizer", optimizer],
            ["learning-rate schedule", schedule_text(cfg)],
            ["loss", loss_text(cfg, records["data"].get("task"))],
            ["batches", f"{cfg.batch_size} images, {SAMPLER_TEXT[cfg.sampler]}; at most {cfg.epochs} epochs"],
            ["augmentation", augmentation_text(cfg)],
            ["stopping and selection", ("each fold model: " if "folds" in train else "")
             + f"stop after {cfg.patience} epochs without a better validation "
                                       f"{said['selection']}; keep the best "
                                       "epoch's weights" + (f" (of the exponential moving average of the weights, decay {cfg.ema})"
                                                            if cfg.ema else "")
             + (" (validation: the fold's own held-out images)" if "folds" in train else "")],
            ["epochs run / selected", folds.epochs_text(train)],
            ["seed", params.seed],
            ["determinism", determinism_text(records["train_timing"])],
            ["model package sha256", f"{records['model_sha256']} (models/model.pt: network, preprocessing, "
                                     "temperature and threshold, as pipeline.predict and the MLflow model use it)"],
            ["differential privacy", "none (train.privacy.enabled: false)" if "privacy" not in train else
             f"DP-SGD, ε = {fmt(train['privacy']['epsilon'])} at δ = {fmt(train['privacy']['delta'])} "
             f"({train['privacy']['accountant']} accountant, clipping {fmt(train['privacy']['max_grad_norm'])}, "
             f"noise multiplier {fmt(train['privacy']['noise_multiplier'])}); see Privacy"],
            ["network sha256", records["package"]["provenance"]["network_sha256"]],
            ["prepared data sha256", records["package"]["provenance"]["data_sha256"]],
            ["out-of-distribution flag", records["package"]["intensity"]["rule"]]]


def decision_text(test: dict[str, Any], chosen_on: str = "the validation split") -> str:
    if test["threshold_rule"] == "median grade":
        return ("Decision: the median grade, the first grade whose cumulative probability reaches 0.5 (calibrated "
                "on validation, frozen before the test split was scored).")
    if isinstance(test["threshold"], list):
        return (f"Operating points: one threshold per finding on P(finding), chosen on the validation split by rule "
                f"'{test['threshold_rule']}' and frozen before the test split was scored (see the table per finding).")
    if test["threshold"] is None:
        return "Decision: the class with the highest probability (multi-class)."
    return (f"Operating point: threshold {fmt(test['threshold'])} on P(positive), chosen on {chosen_on} by "
            f"rule '{test['threshold_rule']}' and frozen before the test split was scored.")


def calibration_text(calib: dict[str, Any], names: list[str]) -> str:
    if "member_temperatures" in calib:
        return ("Calibration: temperature scaling of each fold model, fitted on its own held-out fold ("
                + ", ".join(fmt(t) for t in calib["member_temperatures"]) + "); the ensemble averages the calibrated "
                "probabilities and adds no temperature of its own.")
    if calib["method"] == "temperature" and isinstance(calib["temperature"], list):
        return ("Calibration: temperature scaling per finding, fitted on validation: "
                + ", ".join(f"{n} {fmt(v)}" for n, v in zip(names, calib["temperature"])) + ".")
    if calib["method"] == "temperature":
        return f"Calibration: temperature scaling, temperature {fmt(calib['temperature'])} fitted on validation."
    return "Calibration: none (evaluate.calibrate: none); probabilities are the network's softmax."


def plural(count: int, noun: str) -> str:
    """``2 true positives``, ``3 misclassified lesion images``: the count with its noun."""
    if count == 1:
        return f"1 {noun}"
    return f"{count} {noun.replace('image', 'images', 1) if 'image' in noun else noun + 's'}"


def sample_text(explain: dict[str, Any]) -> str:
    """How many images were explained, by why they were chosen, and any outcome the test split lacks."""
    counts: dict[str, int] = {}
    for sample in explain["samples"]:
        counts[sample["why"]] = counts.get(sample["why"], 0) + 1
    text = (f"{plural(len(explain['samples']), 'test image')} explained: "
            + ", ".join(plural(k, why) for why, k in counts.items()) + f" (explain.per_outcome "
            f"{explain['settings']['per_outcome']}, explain.worst {explain['settings']['worst']}).")
    absent = [kind for kind, n in explain.get("outcomes_available", {}).items() if n == 0]
    return text + (f" The test split has no {', no '.join(absent)}." if absent else "")


def decision_sentence(decision: dict[str, Any]) -> str:
    """The decision each map explains, as the model package makes it."""
    if decision["rule"] == "argmax":
        return (f"Each map explains the model's decision: the class with the highest probability (temperature "
                f"{fmt(decision['temperature'])}).")
    if decision["rule"] == "median grade":
        return (f"Each map explains the model's grade, the median grade after temperature "
                f"{fmt(decision['temperature'])}: the map of the output that decides \"this grade or above\" (a "
                "grade-0 decision: the map of \"grade 1 or above\", which it turned down).")
    if "thresholds" in decision:
        return ("Each map explains one finding: the map of that finding's own output, for images where the finding "
                "was found, missed or falsely called at its threshold frozen on validation ("
                + ", ".join(f"{name} {fmt(v)}" for name, v in decision["thresholds"].items()) + ").")
    return (f"Each map explains the model's decision: P({decision['positive_class']}) after temperature "
            f"{fmt(decision['temperature'])}, against the threshold {fmt(decision['threshold'])} frozen on validation "
            f"({decision['positive_class']} at or above it, else {decision['negative_class']}), as pipeline.predict "
            "decides.")


def method_settings_text(methods: list[str], settings: dict[str, Any]) -> str:
    described = {
        "integrated_gradients": f"Integrated Gradients: black baseline, {settings['ig_steps']} steps",
        "smoothgrad": f"SmoothGrad: {settings['smoothgrad_samples']} samples, σ {settings['smoothgrad_stdev']}",
        "occlusion": f"occlusion: patch {settings['occlusion_window']} of the image side",
        "lime": f"LIME: {settings['lime_samples']} samples on a {settings['lime_grid']}×{settings['lime_grid']} grid",
    }
    return "; ".join(described[m] for m in methods if m in described)


def intended_use_text(params: Params, data: dict[str, Any]) -> str:
    """The intended use the run can back: a phantom run is a demonstration, whatever the param says."""
    if data["input"]["source"] == "phantom":
        return ("This run is a demonstration on simulated phantom scans: its model is meant for those scans only, "
                "to show and test the pipeline, never for real images. " + params.report.intended_use)
    return params.report.intended_use


def identifiers_text(data: dict[str, Any]) -> str:
    """What identifies images and patients in every output, from prepare's record."""
    found = data.get("identifiers") or {}
    if not found:
        return "The run did not record how its images are identified."
    patients = (f"Patient ids are replaced by {found['patients']}" if found.get("patients")
                else "The data carry no patient ids")
    salt = {"set": "; the salt is secret and never written", "empty": "; the salt was empty, so anyone holding the "
            "files can recompute the pseudonyms"}.get(found.get("salt"), "")
    return f"Images are identified by {found['images']}{salt}. {patients}. No DICOM tag outside a short whitelist is kept."


def check_rows(data: dict[str, Any]) -> list[list[Any]]:
    """[check, result] for prepare's data checks; a check with nothing to check says so instead of 0."""
    rows = []
    for key, value in flatten(data.get("checks", {})).items():
        if key == "patient_overlap" and value is None:
            value = "not applicable: no split carries patient ids, so none could be checked"
        rows.append([key, value])
    return rows


# --- sections as template context --------------------------------------------------------------

def context(params: Params, root: Path, records: dict[str, Any]) -> dict[str, Any]:
    """Everything ``report.html.j2`` and ``model_card.md.j2`` show."""
    data, ev, balance = records["data"], records["eval"], records["balance"]
    test, names = ev["test"], data["class_names"]
    known = catalog.lookup(data["input"]["source"], data["input"].get("path"))
    warnings = limitations(records)
    return {
        "title": params.report.title, "intended_use": intended_use_text(params, data), "params": params,
        "warnings": warnings, "names": names, "test": test, "ev": ev, "train": records["train"],
        "model_sha256": records["model_sha256"],
        "summary_rows": [[metric_name(k, records), test[k], fmt_ci(test, k)] for k in summary_keys(ev)],
        "decision": decision_text(test, "the pooled out-of-fold predictions" if ev.get("cross_validation")
                                  else "the validation split"),
        "data": {
            "provenance": [[k, v] for k, v in flatten(data["input"]).items()],
            "known": known,
            "source": source_text(data),
            "inclusion": inclusion_text(data),
            "split": split_text(data),
            "identifiers": identifiers_text(data),
            "counts": [[s, d["n"], *[d["class_counts"][n] for n in names], *[d["prevalence"][n] for n in names]]
                       for s, d in ((s, data["splits"][s]) for s in SPLITS)],
            "skipped": [[row["id"], row["reason"]] for row in data.get("skipped", [])],
            "checks": check_rows(data),
            "sha256": [[k, v] for k, v in data["outputs_sha256"].items()],
            "evaluation_set": f"{known['name'] if known else data['input'].get('path', data['input']['source'])}",
        },
        "preprocessing": preprocessing_facts(params, records),
        "imbalance": {"text": imbalance_text(balance, words(records)),
                      "header": [words(records)["item"], "train before", "train after", words(records)["weight"]],
                      "rows": [[n, balance["before"][n], balance["after"][n], balance["class_weights"][n]] for n in names],
                      "synthetic": balance["synthetic_images"]},
        "model": {"rows": model_rows(params, records), "curves": data_uri(root / paths.TRAIN_DIR / paths.CURVES),
                  "history": [list(r.values()) for r in records["history"]],
                  "history_header": list(records["history"][0]), "search": search.context(params, records, root)},
        "results": results_context(root, records),
        "failures": {"intro": words(records)["failures"] + (
                         " Fold disagreements: the test images the fold models disagree on most (score: the standard "
                         "deviation of their calibrated probabilities)." if paths.DISAGREEMENTS in records["failures"]
                         else ""),
                     "rows": [[kind.replace("_", " ") + (f": {r['finding']}" if "finding" in r else ""), r["id"], r["label"],
                               r["predicted"], r["score"]]
                              for kind, items in records["failures"].items() for r in items],
                     "figure": data_uri(root / paths.EVAL_DIR / paths.FAILURES_PNG)},
        "explanations": explanations_context(root, records),
        "privacy": privacy_context(records),
        "reproducibility": reproducibility_context(params, root, records),
        "card": card_context(params, records),
    }


PRECISION_ORDER = ("sensitivity", "specificity", "ppv", "npv", "accuracy")


def precision_rows(test: dict[str, Any]) -> list[list[Any]]:
    """[estimate, value, from n images, ± half-width of the 95% interval that n allows]."""
    found = test.get("precision", {})
    order = [k for k in PRECISION_ORDER if k in found] + sorted(k for k in found if k not in PRECISION_ORDER)
    return [[key, found[key]["value"], found[key]["n"],
             "n/a" if found[key]["half_width"] is None else f"±{fmt(found[key]['half_width'])}"] for key in order]


def decision_curve_text(curve: dict[str, Any] | None, positive: str, rule: str = "argmax") -> str:
    if curve is None:
        how = {"argmax": "a multi-class model decides by arg-max", "median grade": "grades are decided by the median "
               "grade"}.get(rule, "a multi-label model decides each finding at its own threshold")
        return f"No decision curve: {how}, not at one threshold probability."
    ranges = curve["useful_ranges"]
    where = ("at no threshold probability from 0.01 to 0.99" if not ranges else
             "for threshold probabilities " + ", ".join(f"{fmt(lo)}–{fmt(hi)}" if lo != hi else fmt(lo)
                                                        for lo, hi in ranges))
    return (f"Decision curve (test split, calibrated P({positive})): at the frozen threshold "
            f"{fmt(curve['operating_threshold'])} the model's net benefit is {fmt(curve['net_benefit'])}, against "
            f"{fmt(curve['treat_all'])} for treating every image as {positive} and 0 for treating none. The model "
            f"beats both {where}.")


def results_context(root: Path, records: dict[str, Any]) -> dict[str, Any]:
    ev = records["eval"]
    test, calib = ev["test"], ev["calibration"]
    models = {"CNN": test, **ev.get("baselines", {})}
    positive = records["data"]["class_names"][records["package"]["positive_class"]]
    skipped = ev.get("baselines_skipped", {})
    flagged = ev.get("out_of_distribution", {}).get("test_flagged", 0)
    subgroup_keys = summary_keys(ev)[:2] if "task" in ev else ("roc_auc", "sensitivity", "specificity")
    compared = summary_keys(ev) if "task" in ev else COMPARISON
    return {
        "metrics": [[metric_name(k, records), test[k], fmt_ci(test, k)] for k in summary_keys(ev, full=True)],
        "per_finding": finding_rows(ev, records["data"]["class_names"]),
        "per_finding_header": ["finding", "assessed", "present", *[f"{m.replace('_', ' ')} (95% CI)"
                                                                   for m in FINDING_METRICS], "threshold"],
        "precision": precision_rows(test),
        "per_class_auc": [[k, v] for k, v in test.get("roc_auc_per_class", {}).items()],
        "comparison_header": ["model", *[metric_name(k, records) for k in compared]],
        "comparison": [[name, *[f"{fmt(m[k])} ({fmt_ci(m, k)})" for k in compared]] for name, m in models.items()]
        if ev.get("baselines") else [],
        "comparison_inputs": (f"same volumes, average-pooled in {ev['baseline_voxel_pooling']}³-voxel blocks for the "
                              "baselines" if ev.get("baseline_voxel_pooling") else "same pixels"),
        "skipped": [f"{name} was not fitted: {why}." for name, why in skipped.items()],
        **paired_context(ev.get("comparisons", {}), records),
        "subgroup_header": ["n", *[f"{METRIC_NAMES.get(k, k)}{c}" for k in subgroup_keys for c in ("", " 95% CI")]],
        "subgroups": {group: [[g, m["n"], *[c for k in subgroup_keys for c in (m[k], fmt_ci(m, k))]]
                              for g, m in rows.items()] for group, rows in ev.get("subgroups", {}).items()},
        "calibration": [[when, calib[when]["ece"], fmt_ci(calib[when], "ece"), calib[when]["slope"],
                         fmt_ci(calib[when], "slope"), calib[when]["intercept"], fmt_ci(calib[when], "intercept"),
                         calib[when].get("brier"), calib[when].get("log_loss")] for when in ("before", "after")],
        "calibration_text": calibration_text(calib, records["data"]["class_names"]),
        "decision_curve": decision_curve_text(ev.get("decision_curve"), positive, test["threshold_rule"]),
        "decision_curve_figure": data_uri(root / paths.EVAL_DIR / paths.DECISION_CURVE_PNG)
        if ev.get("decision_curve") else None,
        "out_of_distribution": (f"{flagged} of {test['n']} test images were flagged out of distribution by the model "
                                f"package's intensity check ({records['package']['intensity']['rule']})."),
        "figures": [(data_uri(root / paths.EVAL_DIR / f), alt) for f, alt in (
            (paths.ROC_PNG, "ROC curves"), (paths.PR_PNG, "precision-recall curves"),
            (paths.CONFUSION_PNG, "confusion matrix"), (paths.CALIBRATION_PNG, "reliability diagram"))],
        "confusion": [[n, *row] for n, row in zip(records["data"]["class_names"],
                                                   test.get("confusion_matrix_normalized", []))],
        "robustness": robustness_context(root, ev["robustness"], records),
        "external": external.context(records, data_uri(root / paths.EVAL_DIR / paths.EXTERNAL / paths.FOREST_PNG)
                                     if ev.get("external") else None, lambda key: readable_metric(key, records)),
        "validation": ((f"The out-of-fold predictions of the {ev['val']['n']} development images" if ev.get(
                            "cross_validation") else f"The validation split ({ev['val']['n']} images)")
                       + f" were used for: {'; '.join(ev['val'].get('used_for', []))}. They are in "
                       f"reports/eval/{paths.VAL_PREDICTIONS}, so the threshold and any temperature can be "
                       "recomputed."),
        "cross_validation": folds.context(records),
    }


def paired_context(comparisons: dict[str, dict[str, Any]], records: dict[str, Any]) -> dict[str, Any]:
    """The CNN against each baseline, paired on the same test images (evaluate's
    ``comparisons``: DeLong, McNemar, paired bootstrap differences CNN − baseline)."""
    if not comparisons:
        return {"paired": [], "paired_header": [], "paired_text": []}
    keys = paired.table_metrics(next(iter(comparisons.values())))
    header = ["baseline", *[f"Δ {metric_name(k, records)}" if k != "net_benefit" else "Δ net benefit" for k in keys],
              "DeLong p", "McNemar p"]
    rows = [[name, *[paired.difference_cell(result["differences"][k]) for k in keys],
             paired.p_value(result.get("delong", {}).get("p_value")), paired.p_value(result["mcnemar"]["p_value"])]
            for name, result in comparisons.items()]
    text = [sentence for name, result in comparisons.items()
            for sentence in paired.sentences(result, name.replace("_", " "), "the CNN")]
    return {"paired": rows, "paired_header": header, "paired_text": text}


def robustness_context(root: Path, robustness: dict[str, Any], records: dict[str, Any]) -> dict[str, Any]:
    severities = list(next(iter(robustness["corruptions"].values()), {}))
    clean, said = robustness["clean"], words(records)
    measured = ["roc_auc", "accuracy", *[key for key in clean if key not in ("roc_auc", "accuracy")]]

    def named(key: str) -> str:  # the task's word for a metric; ROC AUC and the metric's key otherwise
        return said.get(key) or {"roc_auc": "ROC AUC"}.get(key, key)

    if not robustness["corruptions"]:
        return {"text": "The corruption benchmark was off (evaluate.corruptions: []).", "header": [], "rows": [],
                "figure": data_uri(root / paths.EVAL_DIR / paths.ROBUSTNESS_PNG)}
    return {
        "text": (f"{robustness['images']} test images, clean: {named('roc_auc')} "
                 f"{fmt(clean['roc_auc'])}, {named('accuracy')} {fmt(clean['accuracy'])} at the "
                 f"frozen decision ({records['eval']['test']['threshold_rule']}). Under {len(robustness['corruptions'])} "
                 f"corruption(s) at severities {', '.join(severities)}, ROC AUC changes by "
                 f"{signed(robustness['mean_roc_auc_drop'])} and accuracy by {signed(robustness['mean_accuracy_drop'])} "
                 "on average."),
        # every metric the benchmark measured: ROC AUC and accuracy, and kappa for grades
        "header": ["corruption", *[f"{named(key)}, severity {s}" for key in measured for s in severities]],
        "rows": [[name, *[levels[s][key] for key in measured for s in severities]]
                 for name, levels in robustness["corruptions"].items()],
        "figure": data_uri(root / paths.EVAL_DIR / paths.ROBUSTNESS_PNG),
    }


def signed(drop: float | None) -> str:
    """A mean drop as the signed change a reader expects (a drop of 0.05 is -0.05)."""
    return "n/a" if drop is None else f"{-drop:+.4g}"


def apart(a: float, b: float) -> tuple[str, str]:
    """Two numbers with enough significant digits to tell them apart (4 to 8), so a comparison
    the report states can be read off the digits it shows."""
    for digits in range(4, 9):
        shown = f"{a:.{digits}g}", f"{b:.{digits}g}"
        if shown[0] != shown[1] or a == b:
            return shown
    return shown


def verdicts(row: dict[str, Any], random: dict[str, Any], threshold: float) -> list[str]:
    """Each check's verdict for one method, with the numbers and the rule behind it."""
    spearman = row["randomised_all_layers_spearman"]
    shown = apart(spearman, threshold)[0]
    sanity = f"pass: Spearman {shown} ≤ {threshold}" if row["sanity_pass"] else f"FAIL: Spearman {shown} > {threshold}"
    deletion = " {} ".join(apart(row["deletion_auc"], random["deletion_auc"])).format(
        "<" if row["deletion_beats_random"] else "≥")
    insertion = " {} ".join(apart(row["insertion_auc"], random["insertion_auc"])).format(
        ">" if row["insertion_beats_random"] else "≤")
    deletion, insertion = f"deletion {deletion}", f"insertion {insertion}"
    faithful = f"{'pass' if row['faithful'] else 'FAIL'}: {deletion}, {insertion} (random order)"
    if "localisation_by_finding" in row:
        place = "; ".join(f"{name} {'pass' if r['localisation_pass'] else 'FAIL'}: pointing game "
                          f"{fmt(r['pointing_game'])} (95% CI {fmt(r['pointing_game_ci_low'])}–"
                          f"{fmt(r['pointing_game_ci_high'])}, chance {fmt(r['pointing_game_chance'])})"
                          for name, r in row["localisation_by_finding"].items() if r["localisation_pass"] is not None)
    elif row.get("localisation_pass") is None:
        place = "not applicable: no lesion masks"
    else:
        place = (f"{'pass' if row['localisation_pass'] else 'FAIL'}: pointing game {fmt(row['pointing_game'])} "
                 f"(95% CI {fmt(row['pointing_game_ci_low'])}–{fmt(row['pointing_game_ci_high'])}) "
                 f"{'>' if row['localisation_pass'] else 'not above'} chance {fmt(row['pointing_game_chance'])}")
    return [sanity, faithful, place]


def localisation_text(explain: dict[str, Any]) -> str | None:
    found = explain.get("localisation")
    if not found:
        return None
    if "findings" in found:
        return ("Localisation per finding: the map of each finding's output for every test image that has it ("
                + ", ".join(f"{name}: {n} images" for name, n in found["findings"].items())
                + f"; explain.localisation_images {explain['settings']['localisation_images']} at most), whatever "
                "the model decided, against that finding's own mask. A method localises a finding when the 95% CI "
                "of its pointing game (its peak within 1 px of the mask) lies above chance.")
    return (f"Localisation: the maps of {found['class']} for {found['images']} test images with a {found['class']} mask "
            f"(explain.localisation_images {explain['settings']['localisation_images']}), whatever the model decided, "
            "against the masks. A method localises when the 95% CI of its pointing game (its peak within 1 px of the "
            "mask) lies above chance, the share of the image a random peak would hit.")


def explanations_context(root: Path, records: dict[str, Any]) -> dict[str, Any]:
    ex, trust = records["explain"], records["explain_metrics"]
    methods, settings = ex["methods"], ex["settings"]
    columns = [(k, title) for k, title in TRUST_COLUMNS if any(k in trust["explain"][m] for m in methods)]

    def value(row: dict[str, Any], key: str) -> Any:
        return f"{fmt(row[key])} ({fmt_ci(row, key)})" if f"{key}_ci_low" in row else row.get(key)

    rows = [[m, *[value(trust["explain"][m], k) for k, _ in columns]] for m in methods]
    rows.append(["random order", trust["random"]["deletion_auc"], trust["random"]["insertion_auc"],
                 *[None] * (len(columns) - 2)])
    figures = root / paths.EXPLAIN_DIR / paths.FIGURES
    extra = [(data_uri(figures / f), alt) for f, alt in ((paths.FEATURE_MAPS_PNG, "feature maps"),
                                                         (paths.CLASS_IMAGES_PNG, "gradient-ascent class images"))
             if (figures / f).is_file()]
    return {
        "intro": (f"Methods (Captum): {', '.join(methods)}. {decision_sentence(ex['decision'])} {sample_text(ex)} "
                  + method_settings_text(methods, settings)),
        "sanity_threshold": settings["sanity_threshold"],
        "localisation": localisation_text(ex),
        "verdicts": [[m, *verdicts(trust["explain"][m], trust["random"], settings["sanity_threshold"])] for m in methods],
        "header": ["method", *[t for _, t in columns]], "rows": rows, "warnings": trust["warnings"],
        "curves": data_uri(figures / paths.FAITHFULNESS_PNG), "extra": extra,
        "samples": [(data_uri(figures / s["figure"]), s["id"]) for s in ex["samples"]],
    }


def reproducibility_context(params: Params, root: Path, records: dict[str, Any]) -> dict[str, Any]:
    git = git_state(root)
    timing = {"train (s)": records["train_timing"]["seconds"], **records["eval_timing"]}
    lock = records["dvc_lock"] or {}
    trained = records["train_timing"].get("kernels") or {}
    machine = [[f"training: {label}", trained[key]] for key, label in (
        ("cpu", "CPU"), ("cpu_flags", "CPU instruction sets"), ("mode", "kernels (MEDCNN_KERNELS)"),
        ("aten_capability", "ATen CPU capability"), ("onednn_max_cpu_isa", "oneDNN max ISA"),
        ("mkl_cbwr", "MKL code path (MKL_CBWR)"), ("numpy_simd", "numpy SIMD"), ("openblas", "OpenBLAS kernels"),
        ("threads", "threads"), ("torch", "torch"), ("mkl", "MKL"), ("onednn", "oneDNN")) if key in trained]
    return {
        "scope": determinism_text(records["train_timing"]),
        "rows": [["git commit", git["commit"]], ["uncommitted changes", git["dirty"]],
                 ["training device", records["train_timing"].get("device", "cpu")], *machine,
                 *[[k, v] for k, v in versions().items()],
                 *[[f"run time: {k}", v] for k, v in timing.items()]],
        "lock": [[stage, o["path"], o.get("md5", "")] for stage, entry in lock.get("stages", {}).items()
                 if stage not in AFTER_REPORT for o in entry.get("outs", [])],
        "params": effective.rows(params, records),
    }


ATTACKS = {"loss": "loss threshold (Yeom et al. 2018)",
           "calibrated": "per-class calibrated log-odds (difficulty-calibrated, as in LiRA's offline attack)"}


def privacy_guarantee_text(train: dict[str, Any]) -> list[str]:
    """What the training guarantees, in plain words, from the run's own train metrics."""
    spent = train.get("privacy")
    if spent is None:
        return ["Trained without differential privacy (train.privacy.enabled: false): the model carries no formal "
                "guarantee about its training images; the membership audit measures what two attacks can tell."]
    generator = ("a cryptographically secure generator (secure_mode)" if spent["secure_mode"] else
                 "a seeded generator, so the run is reproducible; an attacker who knows the seed and every other "
                 "input could remove the noise, so retrain with train.privacy.secure_mode for release")
    return [
        f"Trained with DP-SGD (Opacus): ({fmt(spent['epsilon'])}, {fmt(spent['delta'])})-differential privacy per "
        f"training image, measured by the {spent['accountant'].upper()} accountant over {spent['steps']} steps of "
        f"Poisson-sampled batches (sampling rate {fmt(spent['sample_rate'])}), each image's gradient clipped to norm "
        f"{fmt(spent['max_grad_norm'])} and Gaussian noise of {fmt(spent['noise_multiplier'])} × that norm added.",
        f"What it means: whether or not any one training image was used, every possible model is at most "
        f"e^{fmt(spent['epsilon'])} = {fmt(math.exp(spent['epsilon']))} times as likely, except with probability "
        f"{fmt(spent['delta'])}. The noise came from {generator}.",
        "What it does not cover: a patient with several training images is protected as a group, with up to that "
        "many times ε; the validation split (used for early stopping, the temperature and the threshold), the test "
        "split and the example images shown in this report are not protected at all; nor is anything outside the "
        "weights (class counts, the preprocessing).",
    ]


def privacy_context(records: dict[str, Any]) -> dict[str, Any]:
    audit = records["eval"]["privacy_audit"]
    rows = [[ATTACKS[name], a["roc_auc"], f"[{fmt(a['roc_auc_ci_low'])}, {fmt(a['roc_auc_ci_high'])}]",
             a["tpr_at_1pct_fpr"], a["tpr_at_0.1pct_fpr"], a["empirical_epsilon"]]
            for name, a in audit["attacks"].items()]
    strongest = max(a["empirical_epsilon"] for a in audit["attacks"].values())
    spent = records["train"].get("privacy")
    bound = (f"The strongest attack proves ε ≥ {fmt(strongest)} (95% confidence, δ = {fmt(audit['delta'])})"
             + (f", consistent with the guarantee ε = {fmt(spent['epsilon'])}." if spent and strongest <= spent["epsilon"]
                else f"; the guarantee claims ε = {fmt(spent['epsilon'])}: an audit above it means the accounting "
                     "or the implementation is wrong." if spent else "."))
    return {
        "guarantee": privacy_guarantee_text(records["train"]),
        "audit": (f"Membership inference audit: {audit['members']} training images (members, a seeded sample) against "
                  f"{audit['non_members']} images of {audit.get('non_members_from', 'the validation split')} "
                  "(non-members from the same population, never trained on); the attacker calibrates on "
                  f"{audit['reference']} other test images. ROC AUC 0.5 means the attacks "
                  "cannot tell members apart; n/a for a rate means too few non-members to measure it."),
        "rows": rows,
        "bound": bound + " An audit with the data's own images is weaker than a worst-case attack: a low audit is "
                         "evidence, not proof, of privacy.",
    }


def card_context(params: Params, records: dict[str, Any]) -> dict[str, Any]:
    data, ev = records["data"], records["eval"]
    known = catalog.lookup(data["input"]["source"], data["input"].get("path"))
    return {
        "metrics": [[metric_name(k, records), fmt(ev["test"][k]), fmt_ci(ev["test"], k)] for k in summary_keys(ev)],
        "groups": [[g, m["n"], fmt(m["roc_auc"]), fmt_ci(m, "roc_auc")]
                   for rows in ev.get("subgroups", {}).values() for g, m in rows.items()],
        "group_names": ", ".join(ev.get("subgroups", {})) or "none available in this dataset",
        "counts": "; ".join(f"{s}: {d['n']} ({', '.join(f'{n} {c}' for n, c in d['class_counts'].items())})"
                            for s, d in ((s, data["splits"][s]) for s in SPLITS)),
        "license": f"License: {known['license']}." if known else "License of the data: not known to the pipeline.",
        "identifiers": identifiers_text(data),
        "stopping": ("each fold model: " if params.cv.k else "") + f"early stopping after {params.train.patience} "
                    f"epochs without a better validation {words(records)['selection']}",
        "architecture": (f"Ensemble of {params.cv.k} {params.train.model} CNNs (one per cross-validation fold)"
                         if params.cv.k else f"{params.train.model} CNN") + (
            f" started from {initialisation_text(params.train.model, records['train']['pretrained'])}"
            if records["train"].get("pretrained") else ""),
        "chosen_on": "the pooled out-of-fold predictions" if params.cv.k else "validation",
        "cross_validated": (f"{ev['cross_validation']['folds']} folds of whole patients over "
                            f"{ev['cross_validation']['images']} development images: pooled out-of-fold ROC AUC "
                            f"{fmt(ev['cross_validation']['pooled']['roc_auc'])} "
                            f"({fmt_ci(ev['cross_validation']['pooled'], 'roc_auc')}), per fold "
                            f"{fmt(ev['cross_validation']['mean']['roc_auc'])} ± "
                            f"{fmt(ev['cross_validation']['sd']['roc_auc'])}; optimistic, as each fold's epoch and "
                            "threshold were chosen on its own images") if ev.get("cross_validation") else None,
        "ood": records["package"]["intensity"]["rule"],
        # external validation sites (evaluate.external): data from elsewhere, scored by the frozen model
        "sites": [[name, site["n"], fmt(site["test"]["roc_auc"]), fmt_ci(site["test"], "roc_auc"),
                   fmt(site["calibration"]["slope"])]
                  for name, site in ev.get("external", {}).get("sites", {}).items()],
    }
