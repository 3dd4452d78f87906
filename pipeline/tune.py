"""Search ``train.*`` and ``balance.*`` params with Optuna, on validation only: ``python -m pipeline.tune``.

A good recipe found on the test split is a test split spent. This search trains each trial
on the prepared training split (with ``cv.folds``, each fold model on its other folds) and
scores it on validation (the folds' mean): the task's validation metric that early stopping
reads, ROC AUC (kappa for grades). The test split is never opened.

- The space is ``tune.space`` in ``params.yaml``: ranges (``low``/``high``, ``log``; whole numbers
  where the param is an integer) and ``choices``, for any ``train.*`` or ``balance.*`` key;
  ``tune.trials`` trials in all, TPE sampling seeded by ``tune.seed``. With ``tune.pruning``, a
  trial whose per-epoch validation metric (per fold with ``cv.folds``) falls below the median of
  earlier trials at the same step is stopped (Optuna's ``MedianPruner``).
- The study lives in an Optuna storage: a SQLite file by default (``optuna.db`` at the project
  root), or the team's PostgreSQL (``--storage postgresql://…``, the cluster ``make
  mlflow-server`` starts) where ``--workers`` processes on one or several machines share it. A
  study of the same name resumes: trials already run are kept, the rest are run.
- One worker with the same seed and trials runs the same trials and gets the same values
  (training is deterministic on the CPU); several workers share the trials out, in an order
  that depends on timing, and may together finish one trial more than asked each. A trial whose
  worker was killed stops sending heartbeats; the next worker to start marks it failed and runs
  its params again, so a study resumes where it was.
- The best trial's params are written to ``--out`` (default ``reports/tune/<study>.yaml``) with
  the study's facts (trials complete, pruned and failed, the best value, each param's
  importance, the prepared data's sha256); ``python -m pipeline.tune args FILE`` prints them as
  ``-S key=value`` for ``dvc exp run``, with ``tune.result=FILE``, so the final model is an
  ordinary, reproducible DVC experiment whose report states the search. A preset
  (``presets/<dataset>.yaml``) is such a file with a ``setting``: the dataset and design it was
  searched on, printed first.
- MLflow gets one run for the study (its facts, the best params) with a nested run per trial.

Needs the prepared data (``dvc repro prepare``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import yaml

from pipeline.core import paths
from pipeline.core.config import Params, SearchDimension, as_dict, build, load_params, override
from pipeline.core.dataset import load_meta
from pipeline.core.errors import PipelineError
from pipeline.core.files import rounded, write_text
from pipeline.core.runtime import configure_logging, run_command, seed_everything

log = logging.getLogger(__name__)

TUNE_DIR = paths.REPORTS / "tune"  # the best params of each study (not a DVC output: a search is run by hand)
DEFAULT_STORAGE = "optuna.db"  # at the project root, beside MLflow's mlflow.db
# A worker's running trial sends a heartbeat this often; one silent for GRACE seconds (its worker
# was killed) is marked failed by the next worker that starts, and run again once with its params.
HEARTBEAT, GRACE = 5, 20
STORAGE_ENV = "MEDCNN_TUNE_STORAGE"  # how --workers hands the storage URL to its processes


def study_name(params: Params, prepared: Path) -> str:
    """A name that resumes the same search and starts a new one for another: a digest of the
    space, trials, seed, pruning, folds, the other params and the prepared data."""
    basis = json.dumps([as_dict(params), load_meta(prepared)["arrays_sha256"]], sort_keys=True)
    return f"tune-{hashlib.sha256(basis.encode()).hexdigest()[:10]}"


def suggest(trial: Any, dimension: SearchDimension) -> Any:
    """The trial's value for one entry of ``tune.space``."""
    if dimension.choices:
        return trial.suggest_categorical(dimension.key, list(dimension.choices))
    if dimension.integer:
        return trial.suggest_int(dimension.key, int(dimension.low), int(dimension.high), log=dimension.log)
    return trial.suggest_float(dimension.key, dimension.low, dimension.high, log=dimension.log)


def with_values(params: Params, values: dict[str, Any], threads: int | None = None) -> Params:
    """``params`` with dotted-key ``values`` (and ``train.threads``) applied, validated like a params
    file: a combination the params refuse (warm-up longer than training) is a :class:`PipelineError`."""
    raw = override(as_dict(params), {**values, **({"train.threads": threads} if threads else {})})
    return build(Params, raw, "")


def objective(params: Params, prepared: Path, threads: int | None) -> Any:
    """Optuna's objective: one trial's validation metric (the folds' mean with ``cv.folds``)."""
    import optuna

    from pipeline import balance, fold, tasks, train

    meta = load_meta(prepared)
    selection = f"val_{tasks.for_data(meta.get('task'), meta['class_names']).selection}"  # what early stopping reads

    def run_trial(trial: optuna.Trial) -> float:
        values = {d.key: suggest(trial, d) for d in params.tune.space}
        trial_params = with_values(params, values, threads)
        seed_everything(trial_params.seed)
        step = 0

        def report(value: float | None) -> None:
            nonlocal step
            step += 1
            if value is None:
                return
            trial.report(value, step)
            if params.tune.pruning and trial.should_prune():
                raise optuna.TrialPruned(f"validation {value:.4f} at step {step} is below the median of earlier trials")

        with tempfile.TemporaryDirectory(prefix=f"medcnn-trial{trial.number}-") as tmp, contextlib.chdir(tmp):
            if not trial_params.cv.k:
                balance.run(trial_params, prepared, Path("balanced"), Path("balance.json"))
                metrics = train.run(trial_params, prepared, Path("balanced"), Path("network.pt"), Path("train"),
                                    checkpoint=None, on_epoch=lambda epoch, value: report(value))
                value = metrics["train"][selection]
            else:
                scores = []
                for number in trial_params.cv.folds:  # each fold's best validation; pruned on the running mean
                    found = fold.run(trial_params, number, prepared, Path("models"), Path("reports"))
                    scores.append(found["train"][selection])
                    report(sum(scores) / len(scores))
                value = sum(scores) / len(scores)
        if value is None:
            raise PipelineError("the validation metric is undefined (one class in the validation split?)")
        return float(value)

    return run_trial


def optimize(params: Params, prepared: Path, storage: str, name: str, threads: int | None = None,
             worker: int = 0) -> None:
    """Run trials of study ``name`` until it holds ``tune.trials`` complete or pruned ones, in this
    process: worker number ``worker`` of the study."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    study = open_study(params, storage, name, worker)
    done = (TrialState.COMPLETE, TrialState.PRUNED)  # a failed trial (a killed worker's) does not count
    left = params.tune.trials - len(study.get_trials(deepcopy=False, states=done))
    if left > 0:
        study.optimize(objective(params, prepared, threads), n_trials=left, catch=(PipelineError,),
                       callbacks=[MaxTrialsCallback(params.tune.trials, states=done)])


def open_study(params: Params, storage: str, name: str, worker: int = 0) -> Any:
    """The study, created if new. Each worker's sampler draws from its own seed (``tune.seed`` +
    its number): workers seeded alike would propose the same first trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The first epochs of a trial are noisy: never prune before two epochs of five trials.
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2) if params.tune.pruning \
        else optuna.pruners.NopPruner()
    with warnings.catch_warnings():  # heartbeats and retries are "experimental" since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        rdb = optuna.storages.RDBStorage(
            storage_url(storage), heartbeat_interval=HEARTBEAT, grace_period=GRACE,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
    return optuna.create_study(storage=rdb, study_name=name, direction="maximize",
                               sampler=optuna.samplers.TPESampler(seed=params.tune.seed + worker), pruner=pruner,
                               load_if_exists=True)


def storage_url(storage: str) -> str:
    """A database URL: a bare file name becomes a SQLite file; ``postgresql://`` goes through
    psycopg 3 (the driver the project installs for MLflow's server)."""
    if "://" not in storage:
        return f"sqlite:///{Path(storage).resolve()}"
    return "postgresql+psycopg://" + storage.removeprefix("postgresql://") if storage.startswith("postgresql://") \
        else storage


def summarise(params: Params, study: Any, prepared_sha256: str) -> dict[str, Any]:
    """The study's facts and its best trial: what the output file and MLflow hold."""
    import optuna
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    states = {state.name.lower(): sum(t.state == state for t in trials)
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    if not states["complete"]:
        raise PipelineError(f"study {study.study_name}: no trial completed ({states}); see the log for why")
    best = study.best_trial
    importances = {}
    if states["complete"] >= 2 and len(params.tune.space) >= 2:
        importances = {k: rounded(v) for k, v in optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=params.tune.seed)).items()}
    return {"study": study.study_name, "trials": len(trials), **states, "best_trial": best.number,
            "prepared_sha256": prepared_sha256,
            "best_value": rounded(best.value),
            "objective": (f"validation metric, mean over {params.cv.k} folds" if params.cv.k
                          else "validation metric of the single split"),
            "space": [{k: list(v) if isinstance(v, tuple) else v for k, v in vars(d).items()
                       if v is not None and v is not False and v != ()} for d in params.tune.space],
            "importance": importances, "params": dict(best.params)}  # exact: the experiment reruns this trial


def log_study(params: Params, study: Any, summary: dict[str, Any], out: Path) -> dict[str, str]:
    """The study as one MLflow run, a nested run per trial (its params, state, value and
    per-step validation metric)."""
    from pipeline.reporting.mlflow_adapter import ChildRecord, RunRecord, log_run

    children = [ChildRecord(name=f"{study.study_name}-trial{t.number}",
                            params={**t.params, "trial.state": t.state.name},
                            metrics={"value": t.value} if t.value is not None else {},
                            step_metrics=[(step, {"validation": value}) for step, value in sorted(
                                t.intermediate_values.items())])
                 for t in study.get_trials(deepcopy=False)]
    metrics = {"best_value": summary["best_value"], **{k: float(summary[k]) for k in ("complete", "pruned", "fail")},
               **{f"importance.{k}": v for k, v in summary["importance"].items()}}
    execution = hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()
    return log_run(RunRecord(
        experiment=params.track.experiment, name=study.study_name, execution=execution, started=None,
        description=(f"**{study.study_name}**: Optuna study of {summary['trials']} trials on the "
                     f"{summary['objective']}; best trial {summary['best_trial']} at {summary['best_value']}. "
                     "The test split was not read."),
        params={f"best.{k}": v for k, v in summary["params"].items()} | {"tune.trials": params.tune.trials,
                                                                         "tune.seed": params.tune.seed},
        metrics=metrics, step_metrics=[], tags={"medcnn.kind": "study"}, artifacts=[(out, "")], texts={},
        children=children))


def run(params: Params, prepared: Path = paths.PREPARED, storage: str = DEFAULT_STORAGE, name: str | None = None,
        workers: int = 1, out: Path | None = None, log_mlflow: bool = True,
        params_file: Path = paths.PARAMS) -> dict[str, Any]:
    """The study ``name`` (default :func:`study_name`) run to ``tune.trials`` trials by ``workers``
    processes, its best params written to ``out``; returns the summary."""
    load_meta(prepared)  # a clear error when the data are not prepared
    if workers > 1 and storage_url(storage).startswith("sqlite"):
        raise PipelineError("--workers > 1 needs a database server: SQLite serialises every write and its locks time "
                            "out under several workers; use the tracking server's PostgreSQL (make mlflow-server, then "
                            "--storage \"$(scripts/mlflow-server.sh optuna-url)\")")
    name = name or study_name(params, prepared)
    open_study(params, storage, name)  # created once, before workers race to create it
    if workers == 1:
        optimize(params, prepared.resolve(), storage, name)
    else:
        threads = max(1, params.train.threads // workers)
        command = [sys.executable, "-m", "pipeline.tune", "--params", str(params_file.resolve()), "--study", name,
                   "--prepared", str(prepared.resolve()), "--threads", str(threads)]
        log.info("%d workers, %d thread(s) each, on study %s", workers, threads, name)
        # The storage URL may hold a password: in the environment, not on a command line `ps` shows.
        env = {**os.environ, STORAGE_ENV: storage_url(storage)}
        procs = [subprocess.Popen([*command, "--worker", str(i)], env=env) for i in range(workers)]
        failed = [p.args for p in procs if p.wait() != 0]
        if failed:
            raise PipelineError(f"{len(failed)} of {workers} tune workers failed (see their log above)")
    import optuna

    study = optuna.load_study(study_name=name, storage=storage_url(storage))
    summary = summarise(params, study, load_meta(prepared)["arrays_sha256"])
    out = out or TUNE_DIR / f"{name}.yaml"
    write_text(out, yaml.safe_dump(summary, sort_keys=False, allow_unicode=True))
    if log_mlflow:
        summary["mlflow_run_id"] = log_study(params, study, summary, out)["run_id"]
    log.info("study %s: %d trials (%d complete, %d pruned, %d failed), best validation %s: %s; apply with "
             "dvc exp run %s", name, summary["trials"], summary["complete"], summary["pruned"], summary["fail"],
             summary["best_value"], summary["params"], " ".join(overrides_args(summary["params"])))
    return summary


def overrides_args(values: dict[str, Any]) -> list[str]:
    """``-S key=value`` arguments for ``dvc exp run`` (values in YAML's flow style, lists as JSON)."""
    def flow(value: Any) -> str:  # no spaces: the arguments survive the shell's word splitting of $(...)
        if isinstance(value, (list, dict)):
            return json.dumps(value, separators=(",", ":"))
        return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    return [arg for key, value in values.items() for arg in ("-S", f"{key}={flow(value)}")]


def preset_args(path: Path) -> list[str]:
    """``-S`` arguments that make a DVC experiment of a study file or preset: its ``setting`` (the
    dataset and design it was searched on), its best params, and ``tune.result`` (the report then
    states the search)."""
    from pipeline.reporting.search import read_study

    found = read_study(path)
    return overrides_args({**found.get("setting", {}), **found["params"], "tune.result": str(path)})


def main() -> None:
    if sys.argv[1:2] == ["args"]:  # python -m pipeline.tune args FILE: -S key=value for dvc exp run
        parser = argparse.ArgumentParser(prog="python -m pipeline.tune args")
        parser.add_argument("file", type=Path)
        args = parser.parse_args(sys.argv[2:])
        run_command(lambda: print(" ".join(preset_args(args.file))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=paths.PARAMS, type=Path, help="params file (default: params.yaml)")
    parser.add_argument("--storage", default=DEFAULT_STORAGE,
                        help="Optuna storage: a SQLite file (default optuna.db) or a database URL (postgresql://…)")
    parser.add_argument("--study", help="study name (default: a digest of the params and data, so a rerun resumes)")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the study (default 1)")
    parser.add_argument("--prepared", type=Path, default=paths.PREPARED, help="prepared data (default data/prepared)")
    parser.add_argument("--out", type=Path, help="best params file (default reports/tune/<study>.yaml)")
    parser.add_argument("--no-log", action="store_true", help="do not log the study to MLflow")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # the number of one of --workers' processes
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    configure_logging()

    def work() -> int:
        params = load_params(args.params)
        if args.workers < 1:
            raise PipelineError("--workers must be >= 1")
        if args.worker is not None:
            optimize(params, args.prepared, os.environ[STORAGE_ENV], args.study, args.threads, args.worker)
            return 0
        run(params, args.prepared, args.storage, args.study, args.workers, args.out, not args.no_log, args.params)
        return 0

    run_command(work)


if __name__ == "__main__":
    main()

