"""Stage 6, report: ``reports/report.html``, one self-contained file for reviewers.

Figures are embedded as PNG data URIs and the page carries its own CSS: it opens offline and
makes no network request. Every number is read from the stage outputs declared in dvc.yaml,
never recomputed here, so a reviewer can trace each one to its file. Sections follow the
order of the CLAIM checklist: summary, data, preprocessing and imbalance, model, results,
explanations, reproducibility, limitations.
"""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path
from typing import Any

from pipeline import paths
from pipeline.files import read_csv, read_json, sha256_file, write_text
from pipeline.params import Params, as_dict, flatten
from pipeline.provenance import git_state, hardware, versions
from pipeline.runtime import stage_main

log = logging.getLogger(__name__)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #345}h2{margin-top:1.8em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f2f4f7}code{background:#f4f4f4;padding:0 .2em;word-break:break-all}img{max-width:100%}
.warn{background:#fff4e5;border-left:4px solid #e69500;padding:.4em .8em}.muted{color:#666;font-size:.9em}
@media print{h2{page-break-after:avoid}img{page-break-inside:avoid}}
"""


def table(rows: list[list[Any]], header: list[str] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def build_sections(params: Params, root: Path) -> list[str]:
    reports = root / paths.REPORTS
    data = read_json(root / paths.DATA_SUMMARY)
    balance = read_json(root / paths.BALANCE_REPORT)
    train = read_json(root / paths.TRAIN_DIR / "metrics.json")["train"]
    timing = read_json(root / paths.TRAIN_DIR / "timing.json")
    history = read_csv(root / paths.TRAIN_DIR / "history.csv")
    test = read_json(root / paths.EVAL_DIR / "metrics.json")["test"]
    explain = read_json(root / paths.EXPLAIN_DIR / "samples.json")
    names = data["class_names"]
    headline = ["accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity", "f1"]
    warnings = limitations(data, test)

    summary = (f"<p>{html.escape(params.report.intended_use)}</p>"
               + table([[k, test[k]] for k in headline] + [["test images", test["n"]]], ["test metric", "value"])
               + "".join(f'<p class="warn">{html.escape(w)}</p>' for w in warnings))
    split_rows = [[s, d["n"], *[d["class_counts"][n] for n in names], *[d["prevalence"][n] for n in names]]
                  for s, d in data["splits"].items()]
    source = data["input"]
    data_body = (table([[k, v] for k, v in flatten(source).items()], ["input", "value"])
                 + table(split_rows, ["split", "n", *[f"n {n}" for n in names], *[f"prevalence {n}" for n in names]])
                 + f"<p>Images: {data['image_size'][0]}×{data['image_size'][1]}, {data['channels']} channel(s); "
                 f"classes {', '.join(names)}. Split: {_split_method(source)}.</p>"
                 + "<p class='muted'>sha256 of the prepared arrays:</p>"
                 + table([[k, f"{v}"] for k, v in data["outputs_sha256"].items()], ["file", "sha256"]))
    balance_body = (f"<p>Pixels scaled to [0, 1] and standardised with the training split's mean and standard "
                    f"deviation (stored in the model). Imbalance strategy: <b>{html.escape(balance['strategy'])}</b>, "
                    f"applied to the training split only.</p>"
                    + table([[n, balance["before"][n], balance["after"][n], balance["class_weights"][n]] for n in names],
                            ["class", "train before", "train after", "loss weight"]))
    if balance["synthetic_images"]:
        balance_body += (f'<p class="warn">SMOTE created {balance["synthetic_images"]} synthetic training images by '
                         "blending real ones; they are not real scans.</p>")
    model_body = (table([["architecture", params.train.model], ["parameters", train["parameters"]],
                         ["optimizer", params.train.optimizer], ["learning rate", params.train.lr],
                         ["batch size", params.train.batch_size], ["max epochs", params.train.epochs],
                         ["early stopping", f"patience {params.train.patience} on validation ROC AUC"],
                         ["epochs run / best", f"{train['epochs_run']} / {train['best_epoch']}"],
                         ["seed", params.seed], ["training time (s)", timing["seconds"]],
                         ["model sha256", sha256_file(root / paths.MODEL)]])
                  + "<p>The checkpoint of the epoch with the best validation ROC AUC is kept.</p>"
                  + image(root / paths.TRAIN_DIR / "curves.png", "training curves")
                  + table([[r[c] for c in r] for r in history], list(history[0])))
    results_body = (table([[k, test[k]] for k in headline], ["metric", "test"])
                    + "<p>Decision: the class with the highest predicted probability (threshold 0.5 for two classes).</p>"
                    + image(root / paths.EVAL_DIR / "roc.png", "ROC curve")
                    + image(root / paths.EVAL_DIR / "confusion.png", "confusion matrix")
                    + "<p class='muted'>Per-image predictions: <code>reports/eval/predictions.csv</code>.</p>")
    explain_body = (f"<p>Captum methods: {', '.join(explain['methods'])}; Integrated Gradients with a black baseline "
                    f"and {explain['ig_steps']} steps; maps explain the {explain['target']}. Test images drawn per "
                    "class with the run's seed. Green outlines: ground-truth lesion masks (phantom data).</p>"
                    + "".join(image(reports / "explain" / s["figure"], s["id"]) for s in explain["samples"]))
    git = git_state(root)
    repro_body = (table([["git commit", git["commit"]], ["uncommitted changes", git["dirty"]],
                         *[[k, v] for k, v in versions().items()], *[[k, v] for k, v in hardware().items()]],
                        ["item", "value"])
                  + "<p>Reproduce: <code>git checkout &lt;commit&gt; &amp;&amp; make run</code> "
                    "(same params and seed give the same model bytes on CPU).</p>"
                  + table([[k, v] for k, v in flatten(as_dict(params)).items()], ["parameter", "value"]))
    limits_body = "".join(f"<li>{html.escape(w)}</li>" for w in warnings + ["No external test set was used."])
    return [
        section("summary", "1. Summary", summary),
        section("data", "2. Data", data_body),
        section("preprocessing", "3. Preprocessing and imbalance handling", balance_body),
        section("model", "4. Model and training", model_body),
        section("results", "5. Results", results_body),
        section("explanations", "6. Explanations", explain_body),
        section("reproducibility", "7. Reproducibility", repro_body),
        section("limitations", "8. Limitations", f"<ul>{limits_body}</ul>"),
    ]


def limitations(data: dict[str, Any], test: dict[str, Any]) -> list[str]:
    """Automatic warnings a reviewer should see first."""
    found = []
    if data["input"]["source"] == "phantom":
        found.append("Trained and tested on simulated phantom scans: says nothing about performance on real patients.")
    if test["n"] < 200:
        found.append(f"Small test set ({test['n']} images): metrics are uncertain.")
    return found


def run(params: Params, root: Path = Path("."), out: Path = paths.REPORT_HTML) -> Path:
    body = "".join(build_sections(params, root))
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(params.report.title)}"
            f"</title><style>{CSS}</style></head><body><h1>{html.escape(params.report.title)}</h1>{body}</body></html>\n")
    write_text(root / out, page)
    log.info("report written to %s (%.0f kB)", root / out, len(page) / 1024)
    return root / out


def _split_method(source: dict[str, Any]) -> str:
    if source["source"] == "phantom":
        return f"generated per split with seed {source['seed']} (no patient appears twice)"
    return "the splits given in the input file"


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def main() -> None:
    stage_main(__doc__.splitlines()[0], run)


if __name__ == "__main__":
    main()
