"""The hyperparameter search (``python -m pipeline.tune``): a tiny space, 3 trials, on validation only."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import load_params, write_params
from pipeline.core.errors import PipelineError
from pipeline.reporting.search import read_study
from tests.conftest import REPO, TINY

SPACE = [{"key": "train.lr", "low": 0.001, "high": 0.01, "log": True},
         {"key": "balance.strategy", "choices": ["class_weight", "oversample"]},
         {"key": "train.warmup_epochs", "low": 0, "high": 1}]


def tune_params(folder: Path, **overrides):
    return load_params(write_params(folder / "params.yaml", {**TINY, "train.epochs": 2, "tune.trials": 3,
                                                             "tune.space": SPACE, **overrides}, REPO / "params.yaml"))


@pytest.fixture(scope="module")
def prepared_without_test(tmp_path_factory):
    """The tiny phantom prepared, then its test split deleted: a search that read it would fail."""
    from pipeline import prepare

    root = tmp_path_factory.mktemp("tune")
    prepare.run(tune_params(root), root / "prepared", root / "summary.json")
    shutil.rmtree(root / "prepared" / "test")
    return root


def test_a_study_runs_its_trials_on_validation_only_and_repeats_with_its_seed(prepared_without_test, tmp_path):
    import optuna

    from pipeline import tune

    params = tune_params(tmp_path)
    first = tune.run(params, prepared_without_test / "prepared", str(tmp_path / "a.db"), "a", out=tmp_path / "a.yaml",
                     log_mlflow=False)
    assert first["trials"] == 3 and first["complete"] + first["pruned"] + first["fail"] == 3 and first["complete"] >= 1
    best = read_study(tmp_path / "a.yaml")["params"]
    assert set(best) == {"train.lr", "balance.strategy", "train.warmup_epochs"}
    assert 0.001 <= best["train.lr"] <= 0.01 and best["balance.strategy"] in ("class_weight", "oversample")
    assert isinstance(best["train.warmup_epochs"], int)
    study = optuna.load_study(study_name="a", storage=f"sqlite:///{tmp_path / 'a.db'}")
    assert first["best_value"] == pytest.approx(max(t.value for t in study.trials if t.value is not None), abs=1e-6)
    # Each trial's value is the validation metric early stopping kept, reported per epoch.
    assert all(t.value == pytest.approx(max(t.intermediate_values.values())) for t in study.trials if t.value)
    # The same seed and trials, one worker: the same trials, the same values.
    again = tune.run(params, prepared_without_test / "prepared", str(tmp_path / "b.db"), "b", out=tmp_path / "b.yaml",
                     log_mlflow=False)
    other = optuna.load_study(study_name="b", storage=f"sqlite:///{tmp_path / 'b.db'}")
    assert [t.params for t in other.trials] == [t.params for t in study.trials]
    assert [t.value for t in other.trials] == [t.value for t in study.trials]
    assert again["params"] == first["params"]
    # A rerun of a finished study runs nothing more.
    assert tune.run(params, prepared_without_test / "prepared", str(tmp_path / "a.db"), "a", out=tmp_path / "c.yaml",
                    log_mlflow=False)["trials"] == 3


def test_the_best_params_apply_to_dvc_exp_run_as_overrides(prepared_without_test, tmp_path):
    from pipeline import tune

    best = {"setting": {"data.name": "breastmnist", "cv.folds": [1, 2]},
            "params": {"train.lr": 0.0023, "balance.strategy": "smote"}}
    (tmp_path / "best.yaml").write_text(yaml.safe_dump(best, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "pipeline.tune", "args", str(tmp_path / "best.yaml")],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["-S", "data.name=breastmnist", "-S", "cv.folds=[1,2]", "-S", "train.lr=0.0023",
                                  "-S", "balance.strategy=smote", "-S", f"tune.result={tmp_path / 'best.yaml'}"]
    with pytest.raises(PipelineError, match="needs a database server"):
        tune.run(load_params(REPO / "params.yaml"), prepared_without_test / "prepared", str(tmp_path / "x.db"),
                 workers=2)
    with pytest.raises(PipelineError, match="expected a 'params' mapping"):
        (tmp_path / "bad.yaml").write_text("lr: 1\n")
        read_study(tmp_path / "bad.yaml")


@pytest.mark.parametrize("entry, problem", [
    ({"key": "evaluate.threshold", "choices": ["youden"]}, "must be a train"),
    ({"key": "train.lrr", "low": 0.1, "high": 1.0}, "names no param"),
    ({"key": "train.optimizer", "low": 0.1, "high": 1.0}, "is not a number"),
    ({"key": "train.lr", "low": 0.1, "high": 0.01}, "needs low < high"),
    ({"key": "train.lr", "low": 0.0, "high": 0.01, "log": True}, "needs low > 0"),
])
def test_a_bad_search_space_is_one_clear_error(tmp_path, entry, problem):
    with pytest.raises(PipelineError, match=problem):
        tune_params(tmp_path, **{"tune.space": [entry]})


def test_the_study_is_one_mlflow_run_with_a_nested_run_per_trial(prepared_without_test, tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    from pipeline import tune

    params = tune_params(tmp_path, **{"tune.trials": 2})
    summary = tune.run(params, prepared_without_test / "prepared", str(tmp_path / "s.db"), "s", out=tmp_path / "s.yaml")
    client = MlflowClient(f"sqlite:///{mlflow_store}/mlflow.db")
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.data.tags["medcnn.kind"] == "study" and parent.data.metrics["best_value"] == summary["best_value"]
    assert parent.data.params["best.train.lr"] == str(summary["params"]["train.lr"])
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2 and {c.data.params["trial.state"] for c in children} <= {"COMPLETE", "PRUNED", "FAIL"}


@pytest.mark.slow
def test_workers_share_a_study_on_postgresql_and_a_killed_workers_trial_runs_again(prepared_without_test, tmp_path,
                                                                                  mlflow_server):
    """Two workers on the project's PostgreSQL (the cluster `make mlflow-server` starts): no trial
    lost or run twice. Then a worker killed mid-trial: the next start marks its trial failed and
    runs its params again, and the study ends with every trial it asked for."""
    import json
    import signal
    import time

    import optuna
    from optuna.trial import TrialState

    from pipeline import tune

    url = mlflow_server.script("optuna-url").stdout.strip()
    assert url.startswith("postgresql+psycopg://mlflow:")
    params_file = write_params(tmp_path / "params.yaml", {**TINY, "train.epochs": 2, "tune.trials": 4,
                                                          "tune.space": SPACE}, REPO / "params.yaml")
    command = [sys.executable, "-m", "pipeline.tune", "--params", str(params_file), "--storage", url,
               "--prepared", str(prepared_without_test / "prepared"), "--no-log"]
    out = subprocess.run([*command, "--study", "pair", "--workers", "2", "--out", str(tmp_path / "pair.yaml")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert url.split("@")[0] not in out.stderr + out.stdout  # the password never reaches a log
    trials = optuna.load_study(study_name="pair", storage=url).trials
    assert [t.number for t in trials] == list(range(len(trials)))
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) >= 4 and len(trials) <= 5
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == len(trials)  # none run twice

    killed = subprocess.Popen([*command, "--study", "killed", "--out", str(tmp_path / "killed.yaml")], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(KeyError):
            study = optuna.load_study(study_name="killed", storage=url)
            if any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
                break
        time.sleep(0.5)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    time.sleep(tune.GRACE + tune.HEARTBEAT)  # the killed trial's heartbeat goes stale
    summary = tune.run(load_params(params_file), prepared_without_test / "prepared", url, "killed",
                       out=tmp_path / "killed.yaml", log_mlflow=False)
    trials = optuna.load_study(study_name="killed", storage=url).trials
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1, [t.state for t in trials]
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retried) == 1 and retried[0].params == failed[0].params
    assert summary["complete"] + summary["pruned"] == 4


def test_a_run_from_a_study_file_states_the_search_in_its_report(tiny_run, tmp_path):
    """tune.result: the report says which study chose the params, how many trials on what, the
    space and importances, and says so when the run's params or data are not the study's."""
    from pipeline.core.config import as_dict, flatten
    from pipeline.reporting import search
    from tests.conftest import run_stages, tiny_params

    root, params = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    ours = flatten(as_dict(params))
    sha = json.loads((root / "reports/data/summary.json").read_text())["arrays_sha256"]
    study = {"study": "tune-abc", "trials": 12, "complete": 5, "pruned": 6, "fail": 1, "best_trial": 4,
             "prepared_sha256": sha, "best_value": 0.91234, "objective": "validation metric of the single split",
             "space": [{"key": "train.lr", "low": 0.0003, "high": 0.01, "log": True},
                       {"key": "train.aug_rotate", "low": 0.0, "high": 15.0}],
             "importance": {"train.lr": 0.7, "train.aug_rotate": 0.3},
             "params": {"train.lr": ours["train.lr"], "train.aug_rotate": ours["train.aug_rotate"]}}
    (copy / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    found = search.context(tiny_params(copy, **{"tune.result": "study.yaml"}), {"data": {"arrays_sha256": sha}}, copy)
    assert "2 searched params (train.lr, train.aug_rotate)" in found["intro"]
    assert "12 trials (5 complete, 6 pruned, 1 failed)" in found["intro"] and "0.9123" in found["intro"]
    assert found["rows"][0] == ["train.lr", "0.0003 to 0.01, log scale", str(ours["train.lr"]), "0.7"]
    assert found["sentences"] == ["The study ran on the same prepared data as this run."]
    run_stages(copy, tiny_params(copy, **{"evaluate.external": [{"name": "site_c", "source": "phantom",
                                                                  "recalibrate": 0.3}],
                                          "tune.result": "study.yaml", "train.aug_rotate": 1.0}), ("report",))
    html = (copy / "reports/report.html").read_text()
    assert "Hyperparameter search" in html and "tune-abc" in html
    assert "differs from the study&#39;s best trial in train.aug_rotate" in html
    study["prepared_sha256"] = "0" * 64
    (copy / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    other = search.context(tiny_params(copy, **{"tune.result": "study.yaml"}), {"data": {"arrays_sha256": sha}}, copy)
    assert other["sentences"] == [f"The study ran on other prepared data (sha256 {'0' * 12}…, this run's {sha[:12]}…)."]
    with pytest.raises(PipelineError, match="missing.yaml: not found"):
        search.context(tiny_params(copy, **{"tune.result": "missing.yaml"}), {"data": {}}, copy)
