"""Stage 6, report: ``reports/report.html`` for reviewers and ``reports/model_card.md``.

The HTML is one self-contained, printable file: figures are PNG data URIs, CSS is inline,
there is no script and no external reference, so it opens offline and makes no request.
Every number is read from a stage output declared in dvc.yaml, never recomputed here, so a
reviewer can trace each one to its file. Sections follow the CLAIM 2024 checklist items a
pipeline can fill: summary, data, preprocessing and imbalance, model, results, failure
cases, explanations, reproducibility, limitations. The model card uses the section names of
Mitchell et al. (2019).
"""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path
from typing import Any

import yaml

from pipeline import catalog, paths
from pipeline.files import read_csv, read_json, sha256_file, write_text
from pipeline.metrics import HEADLINE
from pipeline.params import Params, TrainParams, as_dict, flatten
from pipeline.privacy import public_params
from pipeline.provenance import git_state, hardware, versions
from pipeline.runtime import stage_main
from pipeline.splits import SPLITS

log = logging.getLogger(__name__)

SUMMARY_METRICS = ("roc_auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv", "f1")
CI_WIDTH_LIMIT = 0.1
ECE_LIMIT = 0.1
PREVALENCE_SHIFT_LIMIT = 0.05

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #345}h2{margin-top:1.8em;border-bottom:1px solid #ccc}h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em;display:block;max-width:100%;overflow-x:auto}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f2f4f7}code{background:#f4f4f4;padding:0 .2em;word-break:break-all}img{max-width:100%}
.figs img{max-width:48%;margin-right:1%}.warn{background:#fff4e5;border-left:4px solid #e69500;padding:.4em .8em}
.muted{color:#666;font-size:.9em}
@media print{h2{page-break-after:avoid}img,table{page-break-inside:avoid}}
"""


def fmt(value: Any) -> str:
    """How every number appears in the report (4 significant digits)."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def fmt_ci(metrics: dict[str, Any], key: str) -> str:
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    return "n/a" if low is None or high is None else f"{fmt(low)} – {fmt(high)}"


def table(rows: list[list[Any]], header: list[str] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def para(text: str, cls: str = "") -> str:
    return f'<p class="{cls}">{html.escape(text)}</p>' if cls else f"<p>{html.escape(text)}</p>"


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def load_outputs(root: Path) -> dict[str, Any]:
    """Every stage output the report reads, by name."""
    lock = root / paths.DVC_LOCK
    return {
        "data": read_json(root / paths.DATA_SUMMARY),
        "balance": read_json(root / paths.BALANCE_REPORT),
        "train": read_json(root / paths.TRAIN_DIR / "metrics.json")["train"],
        "train_timing": read_json(root / paths.TRAIN_DIR / "timing.json"),
        "history": read_csv(root / paths.TRAIN_DIR / "history.csv"),
        "eval": read_json(root / paths.EVAL_DIR / "metrics.json"),
        "eval_timing": read_json(root / paths.EVAL_DIR / "timing.json"),
        "failures": read_json(root / paths.EVAL_DIR / "failures.json"),
        "explain": read_json(root / paths.EXPLAIN_DIR / "samples.json"),
        "explain_metrics": read_json(root / paths.EXPLAIN_DIR / "metrics.json"),
        "model_sha256": sha256_file(root / paths.MODEL),
        "dvc_lock": yaml.safe_load(lock.read_text()) if lock.is_file() else None,
    }


def limitations(out: dict[str, Any]) -> list[str]:
    """Automatic warnings, most serious first."""
    data, test, calib = out["data"], out["eval"]["test"], out["eval"]["calibration"]
    found = []
    if data["input"]["source"] == "phantom":
        found.append("Trained and tested on simulated phantom scans: this says nothing about performance on real patients.")
    for check in ("patient_overlap", "duplicates_across_splits"):
        if data.get("checks", {}).get(check):
            found.append(f"Data check failed: {check.replace('_', ' ')} = {data['checks'][check]}.")
    low, high = test.get("roc_auc_ci_low"), test.get("roc_auc_ci_high")
    if low is not None and high - low > CI_WIDTH_LIMIT:
        found.append(f"Small test set: the 95% CI of ROC AUC is {high - low:.3f} wide (> {CI_WIDTH_LIMIT}).")
    if calib["after"]["ece"] > ECE_LIMIT:
        found.append(f"Poor calibration: ECE {calib['after']['ece']:.3f} (> {ECE_LIMIT}) after {calib['method']} "
                     "calibration; predicted probabilities should not be read as risks.")
    shift = prevalence_shift(data)
    if shift > PREVALENCE_SHIFT_LIMIT:
        found.append(f"Class prevalence differs between splits by up to {shift:.3f}; PPV and NPV do not transfer.")
    found += [w for w in out["explain_metrics"]["warnings"] if w.startswith("Shortcut")]
    if out["balance"]["synthetic_images"]:
        found.append(f"SMOTE added {out['balance']['synthetic_images']} synthetic (blended) training images.")
    found.append("No external test set: all splits come from one source, so performance at other sites is unknown.")
    return found


def ordered_splits(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(s, data["splits"][s]) for s in SPLITS]


def prevalence_shift(data: dict[str, Any]) -> float:
    prevalences = [split["prevalence"] for split in data["splits"].values()]
    return max(max(p[c] for p in prevalences) - min(p[c] for p in prevalences) for c in data["class_names"])


def summary_section(params: Params, out: dict[str, Any], warnings: list[str]) -> str:
    test = out["eval"]["test"]
    rows = [[k, test[k], fmt_ci(test, k)] for k in SUMMARY_METRICS]
    rule = test["threshold_rule"]
    return (para(params.report.intended_use)
            + table(rows, ["test metric", "value", "95% CI"])
            + para(f"{test['n']} test images; decision rule: {rule}"
                   + (f", threshold {fmt(test['threshold'])} on P(positive) chosen on validation." if test["threshold"] is not None else "."))
            + "".join(para(w, "warn") for w in warnings))


def data_section(out: dict[str, Any]) -> str:
    data = out["data"]
    names = data["class_names"]
    source = data["input"]
    known = catalog.lookup(source["source"], source.get("path"))
    provenance = table([[k, v] for k, v in flatten(source).items()], ["input", "value"])
    if known:
        provenance += table([["dataset", known["name"]], ["license", known["license"]],
                             *[["citation", c] for c in known["citation"]]])
    else:
        provenance += para("License and citation: not known to this pipeline; the data owner must supply them.", "warn")
    counts = [[s, d["n"], *[d["class_counts"][n] for n in names], *[d["prevalence"][n] for n in names]]
              for s, d in ordered_splits(data)]
    split_rule = (f"generated per split with seed {source['seed']}; every scan is a different simulated patient"
                  if source["source"] == "phantom" else "the splits given in the input file")
    checks = data.get("checks")
    check_text = (table([[k, v] for k, v in flatten(checks).items()], ["check", "result"]) if checks else
                  para("Patient-overlap and duplicate checks: not available for this source (no patient ids).", "muted"))
    return (provenance
            + para(f"Inclusion: all {sum(d['n'] for d in data['splits'].values())} images of the input were used "
                   f"({data.get('excluded', 0)} excluded). Split: {split_rule}.")
            + table(counts, ["split", "n", *[f"n {n}" for n in names], *[f"prevalence {n}" for n in names]])
            + para(f"Images: {data['image_size'][0]}×{data['image_size'][1]}, {data['channels']} channel(s).")
            + check_text
            + para("sha256 of the prepared arrays:", "muted")
            + table([[k, v] for k, v in data["outputs_sha256"].items()], ["file", "sha256"]))


def preprocessing_section(out: dict[str, Any]) -> str:
    balance = out["balance"]
    names = out["data"]["class_names"]
    body = (para("Transforms: pixels stored as uint8; scaled to [0, 1] and standardised with the training split's "
                 "mean and standard deviation (stored in the model); no resizing or augmentation.")
            + para(f"Imbalance strategy: {balance['strategy']}, applied to the training split only.")
            + table([[n, balance["before"][n], balance["after"][n], balance["class_weights"][n]] for n in names],
                    ["class", "train before", "train after", "loss weight"]))
    if balance["synthetic_images"]:
        body += para(f"SMOTE created {balance['synthetic_images']} synthetic training images by blending real "
                     "ones; they are not real scans.", "warn")
    return body


def model_section(params: Params, out: dict[str, Any], root: Path) -> str:
    train, cfg = out["train"], params.train
    optimizer = f"{cfg.optimizer} (lr {cfg.lr}, weight decay {cfg.weight_decay}" + (
        f", momentum {cfg.momentum})" if cfg.optimizer == "sgd" else ")")
    rows = [["architecture", cfg.model + (f" (width {cfg.width})" if cfg.model == "small_cnn" else "")],
            ["parameters", train["parameters"]],
            ["initialisation", "PyTorch defaults (Kaiming-uniform), drawn from the run's seed"],
            ["optimizer", optimizer],
            ["learning-rate schedule", cfg.schedule + (f", {cfg.warmup_epochs} warm-up epoch(s)" if cfg.warmup_epochs else "")
             + (f"; gradient norm clipped at {cfg.grad_clip}" if cfg.grad_clip else "")],
            ["loss", (f"focal (gamma {cfg.focal_gamma})" if cfg.loss == "focal" else "cross-entropy")
             + " with the balance stage's class weights"
             + (f", label smoothing {cfg.label_smoothing}" if cfg.label_smoothing else "")],
            ["batches", f"{cfg.batch_size} images, " + ("class-balanced WeightedRandomSampler draw" if cfg.sampler == "weighted"
                                                        else "seeded shuffle") + f"; at most {cfg.epochs} epochs"],
            ["augmentation", augmentation_text(cfg)],
            ["stopping and selection", f"stop after {cfg.patience} epochs without a better validation ROC AUC; keep the best "
                                       "epoch's weights" + (f" (of the exponential moving average of the weights, decay {cfg.ema})"
                                                            if cfg.ema else "")],
            ["epochs run / selected", f"{train['epochs_run']} / {train['best_epoch']}"],
            ["seed", params.seed],
            ["determinism", f"{cfg.threads} CPU thread(s), deterministic kernels: same params and seed give the same model bytes"],
            ["model sha256", out["model_sha256"]]]
    history = out["history"]
    return (table(rows) + image(root / paths.TRAIN_DIR / "curves.png", "training curves")
            + table([list(r.values()) for r in history], list(history[0])))


def augmentation_text(cfg: TrainParams) -> str:
    parts = [f"{label}{value}{unit}" for label, value, unit in (
        ("rotation ±", cfg.aug_rotate, "°"), ("shift ±", cfg.aug_translate, " of the side"), ("zoom ±", cfg.aug_scale, ""),
        ("brightness/contrast ±", cfg.aug_intensity, "")) if value]
    if cfg.aug_flip:
        parts.append("horizontal flips")
    return "seeded: " + ", ".join(parts) if parts else "none"


def results_section(out: dict[str, Any], root: Path) -> str:
    ev = out["eval"]
    test, calib = ev["test"], ev["calibration"]
    body = "<h3>Test metrics (95% bootstrap CI)</h3>" + table([[k, test[k], fmt_ci(test, k)] for k in HEADLINE],
                                                             ["metric", "CNN", "95% CI"])
    if test["threshold"] is not None:
        body += para(f"Operating point: threshold {fmt(test['threshold'])} on P(positive), chosen on the validation "
                     f"split by rule '{test['threshold_rule']}' and frozen before the test split was scored.")
    else:
        body += para("Decision: the class with the highest probability (multi-class).")
    if "roc_auc_per_class" in test:
        body += table([[k, v] for k, v in test["roc_auc_per_class"].items()], ["class", "one-vs-rest ROC AUC"])
    if ev.get("baselines"):
        models = {"CNN": test, **ev["baselines"]}
        keys = ("roc_auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1")
        body += "<h3>CNN vs classical baselines (same pixels, splits and training set)</h3>" + table(
            [[name, *[f"{fmt(m[k])} ({fmt_ci(m, k)})" for k in keys]] for name, m in models.items()], ["model", *keys])
    for group, rows in ev.get("subgroups", {}).items():
        body += f"<h3>Subgroups by {html.escape(group)}</h3>" + table(
            [[g, m["n"], m["roc_auc"], fmt_ci(m, "roc_auc"), m["sensitivity"], m["specificity"]] for g, m in rows.items()],
            [group, "n", "ROC AUC", "95% CI", "sensitivity", "specificity"])
    body += "<h3>Calibration</h3>" + table(
        [[when, calib[when]["ece"], calib[when]["slope"], calib[when]["intercept"], calib[when]["brier"], calib[when]["log_loss"]]
         for when in ("before", "after")], ["test", "ECE (15 bins)", "slope", "intercept", "Brier", "log loss"])
    body += para(f"Calibration: {calib['method']}" + (f", temperature {fmt(calib['temperature'])} fitted on validation."
                                                       if calib["method"] == "temperature" else "."))
    figures = [("roc.png", "ROC curves"), ("pr.png", "precision-recall curves"), ("confusion.png", "confusion matrix"),
               ("calibration.png", "reliability diagram")]
    body += '<div class="figs">' + "".join(image(root / paths.EVAL_DIR / f, alt) for f, alt in figures) + "</div>"
    names = out["data"]["class_names"]
    body += para("Confusion matrix, normalised by true class (rows sum to 1):") + table(
        [[n, *row] for n, row in zip(names, test["confusion_matrix_normalized"])], ["true \\ predicted", *names])
    return body + para("Per-image probabilities: reports/eval/predictions.csv.", "muted")


def failures_section(out: dict[str, Any], root: Path) -> str:
    rows = [[kind.replace("_", " "), r["id"], r["label"], r["predicted"], r["score"]]
            for kind, items in out["failures"].items() for r in items]
    return (para("The test images the model got wrong with the most confidence (score: P(positive) for binary tasks).")
            + image(root / paths.EVAL_DIR / "failures.png", "failure cases")
            + table(rows, ["kind", "id", "true", "predicted", "score"]))


TRUST_COLUMNS = (("deletion_auc", "deletion AUC ↓"), ("insertion_auc", "insertion AUC ↑"), ("infidelity", "infidelity ↓"),
                 ("sensitivity_max", "max-sensitivity ↓"), ("randomised_top_layer_spearman", "Spearman, top layer random"),
                 ("randomised_all_layers_spearman", "Spearman, all layers random"),
                 ("randomised_all_layers_ssim", "SSIM, all layers random"), ("pointing_game", "pointing game ↑"),
                 ("mass_in_mask", "mass in lesion ↑"), ("auprc_mask", "AUPRC vs mask ↑"), ("marker_mass", "mass on marker"))


def explanations_section(out: dict[str, Any], root: Path) -> str:
    ex, trust = out["explain"], out["explain_metrics"]
    settings = ex["settings"]
    methods = ex["methods"]
    columns = [(k, title) for k, title in TRUST_COLUMNS if any(k in trust["explain"][m] for m in methods)]
    rows = []
    for m in methods:
        row = trust["explain"][m]
        verdict = "FAILS sanity check" if not row["sanity_pass"] else "passes sanity check"
        rows.append([m, verdict, *[row.get(k) for k, _ in columns]])
    rows.append(["random order", "(reference)", trust["random"]["deletion_auc"], trust["random"]["insertion_auc"],
                 *[None] * (len(columns) - 2)])
    explain_dir = root / paths.EXPLAIN_DIR / "figures"
    body = (para(f"Methods (Captum): {', '.join(methods)}. Each map explains the {ex['target']}. "
                 f"{trust['n_samples']} test images: {settings['per_class']} per class (seeded), the {settings['worst']} "
                 "most confident false positives and false negatives, and images with a shortcut marker where one "
                 f"exists. Integrated Gradients: black baseline, {settings['ig_steps']} steps; SmoothGrad: "
                 f"{settings['smoothgrad_samples']} samples, σ {settings['smoothgrad_stdev']}; occlusion patch "
                 f"{settings['occlusion_window']} of the image side; LIME: {settings['lime_samples']} samples on a "
                 f"{settings['lime_grid']}×{settings['lime_grid']} grid.")
            + "<h3>How far each method can be trusted</h3>"
            + para("Faithfulness: deletion/insertion areas (pixels replaced by a blurred copy, or inserted into it, "
                   "in the map's order; compare with the random order), Captum infidelity and max-sensitivity. Sanity: "
                   "Spearman correlation and SSIM between the maps of the trained model and of a copy with its "
                   f"layers re-initialised from the top (a method fails above {settings['sanity_threshold']} after "
                   "full randomisation: its maps do not depend on what was learned). Localisation against the "
                   "ground-truth lesion masks where they exist.")
            + table(rows, ["method", "verdict", *[t for _, t in columns]])
            + "".join(para(w, "warn") for w in trust["warnings"])
            + image(explain_dir / "curves.png", "deletion and insertion curves"))
    figures = [("feature_maps.png", "feature maps"), ("class_images.png", "gradient-ascent class images")]
    body += ("<h3>The seed's visualisations</h3>" + para("Activation maps of each convolution for the first sample, and "
             "gradient-ascent images that maximise each class's score.")
             + "".join(image(explain_dir / f, alt) for f, alt in figures if (explain_dir / f).is_file()))
    body += "<h3>Samples</h3>" + para("Green: ground-truth lesion outline; orange box: shortcut marker.", "muted")
    return body + "".join(image(explain_dir / s["figure"], s["id"]) for s in ex["samples"])


def reproducibility_section(params: Params, out: dict[str, Any], root: Path) -> str:
    git = git_state(root)
    timing = {"train (s)": out["train_timing"]["seconds"], **out["eval_timing"]}
    body = table([["git commit", git["commit"]], ["uncommitted changes", git["dirty"]],
                  *[[k, v] for k, v in versions().items()], *[[k, v] for k, v in hardware().items()],
                  *[[f"run time: {k}", v] for k, v in timing.items()]], ["item", "value"])
    body += para("Reproduce: git checkout <commit>, then make run (or dvc repro): the same params and seed give "
                 "the same model and metrics bytes on CPU.")
    lock = out["dvc_lock"]
    if lock:
        rows = [[stage, o["path"], o.get("md5", "")] for stage, entry in lock.get("stages", {}).items()
                for o in entry.get("outs", [])]
        body += "<h3>dvc.lock: stage outputs</h3>" + table(rows, ["stage", "output", "md5"])
    shown = public_params(flatten(as_dict(params)))
    return body + "<h3>Parameters</h3>" + table([[k, v] for k, v in shown.items()], ["parameter", "value"])


def build_sections(params: Params, root: Path, out: dict[str, Any]) -> list[str]:
    warnings = limitations(out)
    return [
        section("summary", "1. Summary", summary_section(params, out, warnings)),
        section("data", "2. Data", data_section(out)),
        section("preprocessing", "3. Preprocessing and imbalance handling", preprocessing_section(out)),
        section("model", "4. Model", model_section(params, out, root)),
        section("results", "5. Results", results_section(out, root)),
        section("failures", "6. Failure cases", failures_section(out, root)),
        section("explanations", "7. Explanations", explanations_section(out, root)),
        section("reproducibility", "8. Reproducibility", reproducibility_section(params, out, root)),
        section("limitations", "9. Limitations", "<ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul>"),
    ]


def model_card(params: Params, out: dict[str, Any]) -> str:
    """Markdown with the Model Card sections (Mitchell et al. 2019)."""
    data, test, ev = out["data"], out["eval"]["test"], out["eval"]
    known = catalog.lookup(data["input"]["source"], data["input"].get("path"))
    metric_rows = "\n".join(f"| {k} | {fmt(test[k])} | {fmt_ci(test, k)} |" for k in SUMMARY_METRICS)
    group_rows = "\n".join(f"| {g} | {m['n']} | {fmt(m['roc_auc'])} | {fmt_ci(m, 'roc_auc')} |"
                           for rows in ev.get("subgroups", {}).values() for g, m in rows.items())
    counts = "; ".join(f"{s}: {d['n']} ({', '.join(f'{n} {c}' for n, c in d['class_counts'].items())})"
                       for s, d in ordered_splits(data))
    return f"""# Model card: {params.report.title}

## Model Details
- {params.train.model} CNN, {out['train']['parameters']} parameters, trained by medcnn (PyTorch), seed {params.seed}.
- Checkpoint `models/model.pt`, sha256 `{out['model_sha256']}`.
- Optimizer {params.train.optimizer}, learning rate {params.train.lr}, early stopping on validation ROC AUC.

## Intended Use
{params.report.intended_use}

## Factors
Subgroups evaluated: {', '.join(ev.get('subgroups', {})) or 'none available in this dataset'}.

## Metrics
Test metrics at the operating point chosen on validation ({test['threshold_rule']}, threshold {fmt(test['threshold'])}),
with 95% bootstrap confidence intervals ({params.evaluate.bootstrap} resamples).

| metric | value | 95% CI |
|---|---|---|
{metric_rows}

## Evaluation Data
The held-out test split of {known['name'] if known else data['input'].get('path', data['input']['source'])}: {data['splits']['test']['n']} images.

## Training Data
{counts}. Imbalance handling: {out['balance']['strategy']}.

## Quantitative Analyses
| subgroup | n | ROC AUC | 95% CI |
|---|---|---|---|
{group_rows or '| (none) | | | |'}

Calibration (test): ECE {fmt(ev['calibration']['before']['ece'])} before, {fmt(ev['calibration']['after']['ece'])} after {ev['calibration']['method']}.

## Ethical Considerations
No patient identifier is stored in any output. {('License: ' + known['license'] + '.') if known else 'License of the data: not known to the pipeline.'}

## Caveats and Recommendations
""" + "\n".join(f"- {w}" for w in limitations(out)) + "\n"


def run(params: Params, root: Path = Path("."), out: Path = paths.REPORT_HTML, card: Path = paths.MODEL_CARD) -> Path:
    outputs = load_outputs(root)
    body = "".join(build_sections(params, root, outputs))
    title = html.escape(params.report.title)
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{CSS}</style></head><body><h1>{title}</h1>{body}</body></html>\n")
    write_text(root / out, page)
    write_text(root / card, model_card(params, outputs))
    log.info("report written to %s (%.0f kB) and %s", root / out, len(page) / 1024, root / card)
    return root / out


def main() -> None:
    stage_main(__doc__.splitlines()[0], run)


if __name__ == "__main__":
    main()
