"""A team's tracking server, for real: PostgreSQL + `mlflow server`, what track logs there, and faults.

The server is the one `make mlflow-server` starts (scripts/mlflow-server.sh), in a temporary
folder on free ports. Faults are real too: a port nobody listens on, and a server stopped
while track is uploading.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import track
from pipeline.core.errors import PipelineError
from pipeline.reporting.mlflow_adapter import EXECUTION_TAG
from tests.conftest import REPO, free_port, tracking_server


@pytest.fixture
def to_server(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    return mlflow_server


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def test_a_pipeline_execution_reads_back_from_the_server(to_server, tiny_run, tmp_path):
    import mlflow

    root, params = tiny_run
    record = track.run(params, root, tmp_path / "run.json")
    client = client_for(to_server.uri)
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "2"
    assert run.info.run_name == f"phantom-small_cnn-{run.data.tags[EXECUTION_TAG][:7]}"
    history = client.get_metric_history(run.info.run_id, "epoch.val_roc_auc")
    assert [m.step for m in history] == [1, 2]
    test = json.loads((root / "reports/eval/metrics.json").read_text())["test"]
    assert run.data.metrics["test.roc_auc"] == pytest.approx(test["roc_auc"])
    assert "| roc_auc |" in run.data.tags["mlflow.note.content"]  # headline metrics open the run's page
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "params.yaml", "model_card.md", "eval", "explain"} <= artifacts
    local = client.download_artifacts(run.info.run_id, "report.html", str(tmp_path))  # through the proxy
    assert Path(local).read_bytes() == (root / "reports/report.html").read_bytes()
    version = client.get_model_version(record["registered_model"], record["model_version"])
    assert version.run_id == run.info.run_id and version.tags[EXECUTION_TAG] == run.data.tags[EXECUTION_TAG]
    model = mlflow.pyfunc.load_model(f"models:/{record['registered_model']}/{record['model_version']}")
    assert list(model.predict(np.full((1, 32, 32, 1), 128, np.uint8)).columns)[-2:] == ["prediction", "status"]
    # Logging the same execution again finds it instead of logging a duplicate.
    assert track.run(params, root, tmp_path / "again.json")["run_id"] == record["run_id"]


def test_unreachable_server_is_one_line_within_seconds_and_writes_nothing(tiny_run, tmp_path):
    root, _ = tiny_run
    record = root / "reports/mlflow_run.json"
    before = record.read_bytes() if record.exists() else None
    port = free_port()  # nothing listens here
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://alice:s3cret@127.0.0.1:{port}",
           "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pipeline.track", "--params", str(root / "params.yaml")],
                            cwd=root, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: MLflow server http://***@127.0.0.1:{port} is unreachable")
    assert "s3cret" not in result.stderr + result.stdout and "make mlflow-server" in errors[0]
    assert elapsed < 30, elapsed
    assert (record.read_bytes() if record.exists() else None) == before  # nothing written


def runs_of(client, execution: str) -> list:
    experiment = client.get_experiment_by_name("medcnn")
    return client.search_runs([experiment.experiment_id], f"tags.`{EXECUTION_TAG}` = '{execution}'")


def test_server_killed_while_track_uploads(tiny_run, tmp_path, monkeypatch):
    """The run caught half-way stays RUNNING while the server is down; the rerun marks it FAILED
    and leaves exactly one FINISHED run for the execution."""
    root, params = tiny_run
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    execution = track.execution_id(root, params, "")
    with tracking_server() as server:
        env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri, "PYTHONPATH": str(REPO)}
        env.pop("DVC_EXP_NAME", None)
        client = client_for(server.uri)
        logging = subprocess.Popen([sys.executable, "-m", "pipeline.track", "--params", str(root / "params.yaml")],
                                   cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not (client.get_experiment_by_name("medcnn") and runs_of(client, execution)):
            assert logging.poll() is None, logging.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # Killed at once, mid-upload: params, metrics, artifacts and the model are still to come. (A
        # graceful stop lets in-flight requests finish: on a loaded machine the upload won the race.)
        os.killpg(int((Path(server.env["MLFLOW_SERVER_DIR"]) / "mlflow.pid").read_text()), signal.SIGKILL)
        out, err = logging.communicate(timeout=180)
        assert logging.returncode == 1, out + err
        assert [line for line in err.splitlines() if line.startswith("error:")][0].startswith("error: MLflow")
        assert server.script("start").returncode == 0
        client = client_for(server.uri)
        assert [r.info.status for r in runs_of(client, execution)] == ["RUNNING"]  # nothing could mark it
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        record = track.run(params, root, tmp_path / "run.json")
        statuses = sorted(r.info.status for r in runs_of(client, execution))
        assert statuses == ["FAILED", "FINISHED"]
        assert client.get_run(record["run_id"]).info.status == "FINISHED"
        assert track.run(params, root, tmp_path / "again.json")["run_id"] == record["run_id"]
        assert len(runs_of(client, execution)) == 2


def test_a_store_error_during_logging_is_one_clear_error(tiny_run, mlflow_store, monkeypatch):
    """What the user sees when the store fails after the run began: the store named, no traceback."""
    import mlflow
    from mlflow.exceptions import MlflowException

    root, params = tiny_run

    def broken(*args, **kwargs):
        raise MlflowException("connection reset by peer")

    monkeypatch.setattr(mlflow, "log_artifacts", broken)
    with pytest.raises(PipelineError, match=r"MLflow store sqlite:///.*failed while logging \(MlflowException: "
                                            r"connection reset by peer\)"):
        track.run(params, root, mlflow_store / "run.json")
    client = client_for(f"sqlite:///{mlflow_store}/mlflow.db")
    assert [r.info.status for r in runs_of(client, track.execution_id(root, params, ""))] == ["FAILED"]
