"""End to end, as a user runs it: a git+DVC copy of the project, `dvc repro`, `dvc exp run`.

Runs the real DVC commands on tiny params (small phantom, 2 epochs) and checks outputs,
metric keys, which stages a params change reruns, and the MLflow runs through MLflow's own
client.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY, write_params

pytestmark = pytest.mark.slow

STAGES = ["prepare", "balance", "train", "evaluate", "explain", "report", "track"]


def sh(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The project's files (as git sees them) in a fresh git repository, tiny params committed."""
    root = tmp_path_factory.mktemp("project")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    for lock in root.glob("dvc.lock"):
        lock.unlink()  # the tiny params make a different run
    write_params(root / "params.yaml", TINY)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PYTHONPATH": str(root)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DVC_ROOT", None)
    sh(["git", "init", "-q", "-b", "main"], root, env)
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "tiny"], root, env)
    return root, env


def runs(root: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("medcnn")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def test_repro_then_experiment(project):
    root, env = project
    log = sh(["dvc", "repro"], root, env)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in log
    for out in ("models/model.pt", "reports/report.html", "reports/eval/metrics.json", "reports/train/history.csv",
                "reports/eval/roc.png", "reports/explain/samples.json", "reports/mlflow_run.json"):
        assert (root / out).is_file(), out
    metrics = json.loads(sh(["dvc", "metrics", "show", "--json"], root, env))
    flat = json.dumps(metrics)
    for key in ("roc_auc", "balanced_accuracy", "sensitivity", "specificity", "best_epoch"):
        assert f'"{key}"' in flat

    client, found = runs(root)
    assert len(found) == 1
    run = found[0]
    assert run.info.run_id == json.loads((root / "reports/mlflow_run.json").read_text())["run_id"]
    assert run.data.params["train.epochs"] == "2" and run.data.params["data.source"] == "phantom"
    assert 0.0 <= run.data.metrics["test.roc_auc"] <= 1.0
    assert run.data.tags["git.dirty"] == "false"
    assert len(client.get_metric_history(run.info.run_id, "epoch.train_loss")) == 2
    assert client.get_model_version("medcnn", "1").run_id == run.info.run_id  # the package, registered

    # Nothing changed: nothing but the always-run prepare stage runs, and no new MLflow run.
    log = sh(["dvc", "repro"], root, env)
    assert "Running stage 'prepare'" in log and "Running stage 'train'" not in log
    assert len(runs(root)[1]) == 1

    # An explain param reruns exactly explain, report and track.
    write_params(root / "params.yaml", {**TINY, "explain.ig_steps": 6})
    log = sh(["dvc", "repro"], root, env)
    ran = [s for s in STAGES if f"Running stage '{s}'" in log]
    assert ran == ["prepare", "explain", "report", "track"]
    write_params(root / "params.yaml", TINY)
    sh(["dvc", "repro"], root, env)

    # An experiment: second run in the same store, visible to DVC's comparison commands.
    sh(["dvc", "exp", "run", "-S", "train.lr=0.01"], root, env)
    client, found = runs(root)
    assert found[-1].data.params["train.lr"] == "0.01"
    assert found[-1].data.tags["dvc.exp_name"] and found[-1].data.tags["git.dirty"] == "true"
    versions = sorted(client.search_model_versions("name = 'medcnn'"), key=lambda v: int(v.version))
    assert len(versions) == len(found) and versions[-1].run_id == found[-1].info.run_id  # one version per run
    shown = sh(["dvc", "exp", "show", "--json"], root, env)
    assert "train.lr" in shown or '"lr"' in shown
    assert "test" in sh(["dvc", "metrics", "diff", "--json"], root, env)
    sh(["dvc", "plots", "show", "-o", str(root / "dvc_plots")], root, env)
    assert (root / "dvc_plots" / "index.html").is_file()
