"""Stage 7, track: log this pipeline execution as one MLflow run.

Logs every param (dotted names as in params.yaml), every final metric (data summary counts,
training, test), the per-epoch history as step metrics, the report, figures, model,
params.yaml and dvc.lock as artifacts (the pseudonym salt redacted), and tags: git commit, dirty flag, DVC experiment name,
data and model sha256. Writes ``reports/mlflow_run.json`` (run id; not cached by DVC, so a
run restored from DVC's cache never points at a run that does not exist in this store).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.core import paths
from pipeline.core.config import Params, as_dict, flatten
from pipeline.core.files import file_digest, read_csv, read_json, write_json
from pipeline.core.runtime import stage_main
from pipeline.data.privacy import public_params, redact, resolve_salt
from pipeline.reporting.mlflow_adapter import log_run
from pipeline.reporting.provenance import dvc_experiment, git_state, versions

log = logging.getLogger(__name__)


def collect_metrics(root: Path) -> dict[str, float]:
    """Every numeric scalar from the stage metrics files, under dotted names (test.roc_auc,
    explain.saliency.deletion_auc, …)."""
    found = {}
    for path in (paths.TRAIN_DIR / paths.METRICS, paths.EVAL_DIR / paths.METRICS, paths.EXPLAIN_DIR / paths.METRICS):
        for key, value in flatten(read_json(root / path)).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                found[key] = float(value)
    for stage, folder in (("train", paths.TRAIN_DIR), ("eval", paths.EVAL_DIR)):
        for key, value in read_json(root / folder / paths.TIMING).items():
            if isinstance(value, (int, float)):
                found[f"timing.{stage}.{key}"] = float(value)
    return found


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
        (root / paths.MODEL, "model"),
        (root / paths.DATA_SUMMARY, "data"),
        (root / paths.BALANCE_REPORT, "balance"),
        (root / paths.TRAIN_DIR, "train"),
        (root / paths.EVAL_DIR, "eval"),
        (root / paths.EXPLAIN_DIR, "explain"),
    ]
    tags = collect_tags(root)
    record = log_run(params.track.experiment, tags["dvc.exp_name"] or None, public_params(flatten(as_dict(params))),
                     collect_metrics(root), collect_history(root), tags, artifacts,
                     {Path(name).name: text for name, text in texts.items()})
    write_json(root / out, record)
    log.info("logged MLflow run %s to %s", record["run_id"], record["tracking_uri"])
    return record


def main() -> None:
    stage_main(__doc__.splitlines()[0], run)


if __name__ == "__main__":
    main()
