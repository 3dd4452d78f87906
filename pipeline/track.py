"""Stage 7, track: log this pipeline execution as one MLflow run.

The run is named after the DVC experiment (else data source, model and a digest), starts
when the DVC command started and ends when logging does, opens with a note of the headline
test metrics, and carries the tag ``medcnn.execution``: a digest of dvc.lock's stage entries
and the experiment name. An execution is logged once: a FINISHED run with the same tag is
reused, and runs of it left RUNNING by an interrupted attempt are marked FAILED (see
:func:`pipeline.reporting.mlflow_adapter.log_run`, which also bounds the wait for a server).

Logs every param (dotted names as in params.yaml), every final metric (data summary counts,
training, test), the per-epoch history as step metrics, the report, figures, params.yaml and
dvc.lock as artifacts (the pseudonym salt redacted), and tags: git commit, dirty flag, DVC
experiment name, data and model sha256, and what trained the model (``kernels.*``: the CPU,
the kernels each library ran, threads, and the machines on which its bytes repeat). The
model package is logged as an MLflow Model (pyfunc, with a signature and an input example)
and registered as a new version of ``track.registered_model``, tagged with the data source,
test ROC AUC and git commit; move the ``champion`` alias with ``python -m pipeline.promote``. Writes ``reports/mlflow_run.json``
(run id and model version; not cached by DVC, so a run restored from DVC's cache never points
at a run that does not exist in this store).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from pipeline.core import kernels, paths
from pipeline.core.config import DataParams, Params, as_dict, flatten, leaves
from pipeline.core.files import digests_sha256, file_digest, read_csv, read_json, write_json
from pipeline.core.runtime import stage_main
from pipeline.data.privacy import public_params, redact, resolve_salt
from pipeline.evaluation.metrics import summary_keys
from pipeline.reporting.mlflow_adapter import (
    EXECUTION_TAG,
    SOURCE_COMMIT,
    SOURCE_NAME,
    SOURCE_TYPE,
    ChildRecord,
    DatasetSpec,
    ModelSpec,
    RunRecord,
    log_run,
    metric_key,
)
from pipeline.reporting.provenance import dvc_experiment, execution_started, git_state, versions

log = logging.getLogger(__name__)

HEADLINE_PREFIX = "Headline"  # uppercase sorts before every lowercase metric name
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
    # The headline test metrics again, under a name that sorts first in MLflow's compare view
    # (it lists 400+ metrics by name, `baselines.*` first); every metric stays where it was.
    for key in summary_keys(read_json(root / paths.EVAL_DIR / paths.METRICS)):
        if f"test.{key}" in found:
            found[f"{HEADLINE_PREFIX}.test.{key}"] = found[f"test.{key}"]
    return found, renamed


def collect_history(path: Path) -> list[tuple[int, dict[str, float]]]:
    """A ``history.csv`` as MLflow step metrics ``epoch.<column>``, one step per epoch."""
    steps = []
    for row in read_csv(path):
        epoch = int(row.pop("epoch"))
        steps.append((epoch, {f"epoch.{k}": float(v) for k, v in row.items() if v not in ("", "None")}))
    return steps


SPLIT_CONTEXT = {"train": "train", "val": "validation", "test": "test"}


def dataset_origin(data: DataParams, root: Path) -> tuple[str, str]:
    """(name, source) of an input as MLflow shows it: the dataset's name, or its file's, and a
    file:// URI of the file or folder ``data.path`` names (already a logged param), or the
    module that reads or generates it."""
    name = data.name or (Path(data.path).stem if data.path else data.source)
    return name, ((root / data.path).resolve().as_uri() if data.path else f"pipeline.data.{data.source}")


def collect_datasets(params: Params, summary: dict[str, Any], evaluated: dict[str, Any],
                     root: Path) -> list[DatasetSpec]:
    """Each prepared split, and each external validation site, as an MLflow dataset input. The
    digest is the sha256 of the prepared arrays (:func:`~pipeline.core.files.digests_sha256` of a
    split's files in prepare's manifest; a site's as evaluate recorded it), so two runs show the
    same digest exactly when they trained, validated, tested or were validated on the same bytes."""
    name, origin = dataset_origin(params.data, root)
    shape = (summary["channels"], *summary["image_size"])
    found = []
    for split, context in SPLIT_CONTEXT.items():
        digest = digests_sha256({k: v for k, v in summary["outputs_sha256"].items() if k.startswith(f"{split}/")})
        found.append(DatasetSpec(f"{name}-{split}", digest, origin, context, shape, summary["splits"][split]["n"]))
    sites = evaluated.get("external", {}).get("sites", {})
    for site in params.evaluate.external:
        if site.name in sites:
            where = ("pipeline.data.external" if site.source == "phantom"  # the phantom's shifted scanner site
                     else dataset_origin(site.applied_to(params.data), root)[1])
            found.append(DatasetSpec(site.name, sites[site.name]["sha256"], where, "external", shape,
                                     sites[site.name]["n"]))
    return found


def entry_point() -> str:
    """What produced this execution, for MLflow's Source column."""
    if os.environ.get("DVC_EXP_NAME"):
        return "dvc exp run"
    return "dvc repro" if os.environ.get("DVC_ROOT") else "python -m pipeline.track"


def collect_tags(root: Path) -> dict[str, str]:
    git = git_state(root)
    experiment = dvc_experiment()
    data = read_json(root / paths.DATA_SUMMARY)
    tags = {
        SOURCE_NAME: entry_point(),
        SOURCE_TYPE: "LOCAL",
        SOURCE_COMMIT: str(git["commit"]),
        "git.commit": str(git["commit"]),
        "git.dirty": str(git["dirty"]).lower(),
        "dvc.exp_name": experiment["dvc_exp_name"] or "",
        "dvc.baseline_rev": experiment["dvc_exp_baseline_rev"] or "",
        "data.source": data["input"]["source"],
        "data.sha256": data["input"].get("sha256", "generated"),
        "model.sha256": file_digest(root / paths.MODEL),
        # train.privacy.* metrics hold the guarantee; this says at a glance in the run list whether there is one.
        "privacy.dp_sgd": str("privacy" in read_json(root / paths.TRAIN_DIR / paths.METRICS)["train"]).lower(),
    }
    if not git["commit"]:  # not a git checkout: no commit for the Source column to link
        del tags[SOURCE_COMMIT]
    tags.update({f"version.{k}": v for k, v in versions().items()})
    # What trained the model (CPU, the kernels each library ran, threads) and where its bytes repeat.
    trained = read_json(root / paths.TRAIN_DIR / paths.TIMING)
    tags["train.device"] = trained.get("device", "cpu")
    if trained.get("kernels"):
        tags.update({f"kernels.{k}": str(v) for k, v in trained["kernels"].items()})
        tags["kernels.scope"] = kernels.scope(trained["kernels"])
    return tags


def execution_id(root: Path, params: Params, experiment_name: str) -> str:
    """What identifies this pipeline execution: a digest of dvc.lock's stage entries (code, params
    and output hashes of every stage before this one) and the DVC experiment name. Without a
    dvc.lock (a stage run by hand), the digest of what is logged: params, metrics, model."""
    lock = root / paths.DVC_LOCK
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        basis = json.dumps({k: v for k, v in stages.items() if k != "track"}, sort_keys=True, default=str)
    else:
        files = [root / paths.MODEL] + [root / f / paths.METRICS for f in (paths.TRAIN_DIR, paths.EVAL_DIR,
                                                                          paths.EXPLAIN_DIR)]
        basis = json.dumps([as_dict(params), *[file_digest(f) for f in files if f.is_file()]], sort_keys=True)
    return hashlib.sha256(f"{basis}\n{experiment_name}".encode()).hexdigest()


def describe(name: str, params: Params, root: Path) -> str:
    """The run's note in the MLflow UI: what ran, and the headline test metrics first."""
    evaluation = read_json(root / paths.EVAL_DIR / paths.METRICS)
    test = evaluation["test"]
    train = read_json(root / paths.TRAIN_DIR / paths.METRICS)["train"]

    def number(value: Any) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    rows = "\n".join(f"| {k} | {number(test[k])} | {number(test.get(f'{k}_ci_low'))} – {number(test.get(f'{k}_ci_high'))} |"
                     for k in summary_keys(evaluation))
    trained = (f"an ensemble of {train['folds']} fold models" if "folds" in train else
               f"best epoch {train['best_epoch']} of {train['epochs_run']}")
    return (f"**{name}**: data.source {params.data.source}, {params.train.model}, {trained}; decision: "
            f"{test['threshold_rule']}.\n\n"
            f"| test metric | value | 95% CI |\n|---|---|---|\n{rows}\n\n"
            "Every metric is in the Metrics tab (`test.*`, per-epoch `epoch.*`); the reviewer's report is the "
            "artifact `report.html`.")


def collect_folds(params: Params, root: Path, name: str) -> list[ChildRecord]:
    """``cv.folds``: one nested run per fold, with the fold's training and held-out metrics
    (``reports/folds/<n>/metrics.json``) and its per-epoch history."""
    children = []
    for fold in params.cv.folds:
        folder = root / paths.FOLD_REPORTS / str(fold)
        metrics = {metric_key(keys): float(value) for keys, value in leaves(read_json(folder / paths.METRICS))
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        children.append(ChildRecord(name=f"{name}-fold{fold}", params={"cv.fold": fold, "cv.k": params.cv.k},
                                    metrics=metrics, step_metrics=collect_history(folder / paths.HISTORY)))
    return children


def run(params: Params, root: Path = Path("."), out: Path = paths.MLFLOW_RUN) -> dict[str, Any]:
    salt = resolve_salt(params.data.pseudonym_salt)
    texts = {Path(name).name: redact((root / name).read_text(), salt) for name in (paths.PARAMS, paths.DVC_LOCK)
             if (root / name).is_file()}
    artifacts = [
        (root / paths.REPORT_HTML, ""),
        (root / paths.MODEL_CARD, ""),
        (root / paths.DATA_SUMMARY, "data"),
        (root / paths.BALANCE_REPORT, "balance"),
        (root / paths.TRAIN_DIR, "train"),
        (root / paths.EVAL_DIR, "eval"),
        (root / paths.EXPLAIN_DIR, "explain"),
        *([(root / paths.FOLD_REPORTS, "folds")] if params.cv.k else []),
    ]
    tags, (metrics, renamed) = collect_tags(root), collect_metrics(root)
    texts[METRIC_NAMES] = json.dumps(renamed, indent=2, sort_keys=True, ensure_ascii=False)
    execution = execution_id(root, params, tags["dvc.exp_name"])
    name = tags["dvc.exp_name"] or f"{params.data.source}-{params.train.model}-{execution[:7]}"
    data = read_json(root / paths.DATA_SUMMARY)
    model = ModelSpec(root / paths.MODEL, (*data["image_size"], data["channels"]), data["class_names"],
                      params.track.registered_model,
                      {"data.source": tags["data.source"], "git.commit": tags["git.commit"],
                       "test.roc_auc": str(metrics.get("test.roc_auc", "n/a")), EXECUTION_TAG: execution})
    record = log_run(RunRecord(
        experiment=params.track.experiment, name=name, execution=execution, started=execution_started(),
        description=describe(name, params, root), params=public_params(flatten(as_dict(params))), metrics=metrics,
        # cv.folds: the epochs are each fold's, in its nested run
        step_metrics=[] if params.cv.k else collect_history(root / paths.TRAIN_DIR / paths.HISTORY), tags=tags,
        artifacts=artifacts, texts=texts, model=model,
        datasets=collect_datasets(params, data, read_json(root / paths.EVAL_DIR / paths.METRICS), root),
        children=collect_folds(params, root, name) if params.cv.k else ()))
    write_json(root / out, record)
    log.info("logged MLflow run %s (%s) to %s", record["run_id"], name, record["tracking_uri"])
    return record


def main() -> None:
    stage_main(__doc__.splitlines()[0], run)


if __name__ == "__main__":
    main()
