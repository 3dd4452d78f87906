"""Stage 7, track: log this pipeline execution as one MLflow run.

Logs every param (dotted names as in params.yaml), every final metric (data summary counts,
training, test), the per-epoch history as step metrics, the report, figures, params.yaml and
dvc.lock as artifacts (the pseudonym salt redacted), and tags: git commit, dirty flag, DVC
experiment name, data and model sha256. The model package is logged as an MLflow Model
(pyfunc, with a signature and an input example) and registered as a new version of
``track.registered_model``, tagged with the data source, test ROC AUC and git commit; move
the ``champion`` alias with ``python -m pipeline.promote``. Writes ``reports/mlflow_run.json``
(run id and model version; not cached by DVC, so a run restored from DVC's cache never points
at a run that does not exist in this store).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline.core import paths
from pipeline.core.config import Params, as_dict, flatten, leaves
from pipeline.core.files import file_digest, read_csv, read_json, write_json
from pipeline.core.runtime import stage_main
from pipeline.data.privacy import public_params, redact, resolve_salt
from pipeline.reporting.mlflow_adapter import ModelSpec, log_run, metric_key
from pipeline.reporting.provenance import dvc_experiment, git_state, versions

log = logging.getLogger(__name__)

METRIC_NAMES = "metric_names.json"  # {MLflow metric name: dotted name} for names a class or subgroup changed


def collect_metrics(root: Path) -> tuple[dict[str, float], dict[str, str]]:
    """Every numeric scalar from the stage metrics files under dotted names (test.roc_auc,
    explain.saliency.deletion_auc, …), and {MLflow name: dotted name} for each name that had to
    change because a class or subgroup name in it is not a valid MLflow name."""
    found, renamed = {}, {}
    files = [((), folder / paths.METRICS) for folder in (paths.TRAIN_DIR, paths.EVAL_DIR, paths.EXPLAIN_DIR)]
    files += [(("timing", stage), folder / paths.TIMING) for stage, folder in (("train", paths.TRAIN_DIR),
                                                                              ("eval", paths.EVAL_DIR))]
    for prefix, path in files:
        for keys, value in leaves(read_json(root / path)):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                name, dotted = metric_key((*prefix, *keys)), ".".join((*prefix, *keys))
                found[name] = float(value)
                if name != dotted:
                    renamed[name] = dotted
    return found, renamed


def collect_history(root: Path) -> list[tuple[int, dict[str, float]]]:
    steps = []
    for row in read_csv(root / paths.TRAIN_DIR / paths.HISTORY):
        epoch = int(row.pop("epoch"))
        steps.append((epoch, {f"epoch.{k}": float(v) for k, v in row.items() if v not in ("", "None")}))
    return steps


def collect_tags(root: Path) -> dict[str, str]:
    git = git_state(root)
    experiment = dvc_experiment()
    data = read_json(root / paths.DATA_SUMMARY)
    tags = {
        "git.commit": str(git["commit"]),
        "git.dirty": str(git["dirty"]).lower(),
        "dvc.exp_name": experiment["dvc_exp_name"] or "",
        "dvc.baseline_rev": experiment["dvc_exp_baseline_rev"] or "",
        "data.source": data["input"]["source"],
        "data.sha256": data["input"].get("sha256", "generated"),
        "model.sha256": file_digest(root / paths.MODEL),
    }
    tags.update({f"version.{k}": v for k, v in versions().items()})
    return tags


def run(params: Params, root: Path = Path("."), out: Path = paths.MLFLOW_RUN) -> dict[str, Any]:
    salt = resolve_salt(params.data.pseudonym_salt)
    texts = {name: redact((root / name).read_text(), salt) for name in (paths.PARAMS, paths.DVC_LOCK)
             if (root / name).is_file()}
    artifacts = [
        (root / paths.REPORT_HTML, ""),
        (root / paths.MODEL_CARD, ""),
        (root / paths.DATA_SUMMARY, "data"),
        (root / paths.BALANCE_REPORT, "balance"),
        (root / paths.TRAIN_DIR, "train"),
        (root / paths.EVAL_DIR, "eval"),
        (root / paths.EXPLAIN_DIR, "explain"),
    ]
    tags, (metrics, renamed) = collect_tags(root), collect_metrics(root)
    texts = {**texts, METRIC_NAMES: json.dumps(renamed, indent=2, sort_keys=True, ensure_ascii=False)}
    data = read_json(root / paths.DATA_SUMMARY)
    model = ModelSpec(root / paths.MODEL, (*data["image_size"], data["channels"]), data["class_names"],
                      params.track.registered_model,
                      {"data.source": tags["data.source"], "git.commit": tags["git.commit"],
                       "test.roc_auc": str(metrics.get("test.roc_auc", "n/a"))})
    record = log_run(params.track.experiment, tags["dvc.exp_name"] or None, public_params(flatten(as_dict(params))),
                     metrics, collect_history(root), tags, artifacts,
                     {Path(name).name: text for name, text in texts.items()}, model)
    write_json(root / out, record)
    log.info("logged MLflow run %s to %s", record["run_id"], record["tracking_uri"])
    return record


def main() -> None:
    stage_main(__doc__.splitlines()[0], run)


if __name__ == "__main__":
    main()
