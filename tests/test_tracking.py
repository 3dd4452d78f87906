"""track: one MLflow run with params, metrics, step history, artifacts and tags; store location."""

import json

import pytest

from pipeline import track
from pipeline.core.config import as_dict, flatten
from pipeline.reporting import mlflow_adapter


def test_default_store_follows_dvc_root(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert mlflow_adapter.tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://user:secret@db/mlflow")
    assert mlflow_adapter.tracking_uri() == "postgresql://user:secret@db/mlflow"
    assert mlflow_adapter.redact_uri("postgresql://user:secret@db/mlflow") == "postgresql://***@db/mlflow"


def test_track_logs_one_complete_run(tiny_run, mlflow_store, monkeypatch):
    from mlflow.tracking import MlflowClient

    root, params = tiny_run
    (root / "params.yaml").exists() or pytest.fail("tiny run has no params.yaml")
    (root / "dvc.lock").write_text("schema: '2.0'\n")
    monkeypatch.setenv("DVC_EXP_NAME", "tiny-exp")
    record = track.run(params, root, root / "reports/mlflow_run.json")
    assert json.loads((root / "reports/mlflow_run.json").read_text()) == record
    client = MlflowClient(f"sqlite:///{mlflow_store}/mlflow.db")
    run = client.get_run(record["run_id"])
    expected = {k: ("null" if v is None else str(v)) for k, v in flatten(as_dict(params)).items()}
    assert run.data.params == expected
    test = json.loads((root / "reports/eval/metrics.json").read_text())["test"]
    assert run.data.metrics["test.roc_auc"] == pytest.approx(test["roc_auc"])
    assert run.data.metrics["train.best_epoch"] >= 1
    explain = json.loads((root / "reports/explain/metrics.json").read_text())["explain"]
    assert run.data.metrics["explain.saliency.deletion_auc"] == pytest.approx(explain["saliency"]["deletion_auc"])
    history = client.get_metric_history(run.info.run_id, "epoch.val_roc_auc")
    assert [m.step for m in history] == [1, 2]
    assert run.data.tags["dvc.exp_name"] == "tiny-exp" and run.info.run_name == "tiny-exp"
    assert run.data.tags["data.source"] == "phantom" and len(run.data.tags["model.sha256"]) == 64
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "params.yaml", "dvc.lock", "model", "eval", "explain", "train"} <= top
    # Artifacts live beside the store, not in the working directory.
    assert (mlflow_store / "mlartifacts" / run.info.run_id / "artifacts" / "report.html").is_file()
