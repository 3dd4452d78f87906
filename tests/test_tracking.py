"""track: one MLflow run with params, metrics, step history, artifacts and tags; store location."""

import json
import shutil

import pytest

from pipeline import track
from pipeline.core import kernels
from pipeline.core.config import as_dict, flatten
from pipeline.reporting import mlflow_adapter
from tests.conftest import AWKWARD_CLASS_NAMES


def test_default_store_follows_dvc_root(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert mlflow_adapter.tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://user:secret@db/mlflow")
    assert mlflow_adapter.tracking_uri() == "postgresql://user:secret@db/mlflow"
    assert mlflow_adapter.redact_uri("postgresql://user:secret@db/mlflow") == "postgresql://***@db/mlflow"


def test_an_experiment_another_worker_created_meanwhile_is_used(tmp_path):
    """Two queue workers both find no experiment and both create it: the second uses the first's
    (the store answers RESOURCE_ALREADY_EXISTS; this failed a 2-worker queue on the server once)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"

    class LateClient(MlflowClient):
        """Finds no experiment the first time it asks, as the other worker creates it."""

        asked = 0

        def get_experiment_by_name(self, name):
            self.asked += 1
            if self.asked == 1:
                MlflowClient(uri).create_experiment(name)
                return None
            return super().get_experiment_by_name(name)

    experiment_id = mlflow_adapter._experiment(LateClient(uri), "medcnn", default_store=False)
    found = MlflowClient(uri).get_experiment(experiment_id)
    assert found.name == "medcnn" and found.tags["mlflow.experimentKind"] == "custom_model_development"


def test_track_logs_one_complete_run(tiny_run, mlflow_store, monkeypatch):
    from mlflow.tracking import MlflowClient

    root, params = shutil.copytree(tiny_run[0], mlflow_store / "run"), tiny_run[1]  # the shared run stays as it is
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
    audit = json.loads((root / "reports/eval/metrics.json").read_text())["privacy_audit"]["attacks"]["loss"]
    assert run.data.metrics["privacy_audit.attacks.loss.roc_auc"] == pytest.approx(audit["roc_auc"])
    assert run.data.tags["privacy.dp_sgd"] == "false"  # tiny_run trains without DP-SGD
    assert run.data.tags["kernels.mode"] == "portable" and run.data.tags["train.device"] == "cpu"
    assert run.data.tags["kernels.scope"].startswith("any x86-64 CPU with AVX2") or not kernels.supported(kernels.cpu())
    # The runs table's Source and Dataset columns: MLflow's source tags and one input per split,
    # whose digest is that of the split's prepared arrays.
    assert run.data.tags["mlflow.source.name"] == "dvc exp run"  # DVC_EXP_NAME is set above
    assert run.data.tags["mlflow.source.type"] == "LOCAL"
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["phantom-test", "phantom-train", "phantom-val", "site_c"]
    summary = json.loads((root / "reports/data/summary.json").read_text())
    contexts = {name: {t.key: t.value for t in d.tags} for name, d in inputs.items()}
    assert {c["mlflow.data.context"] for c in contexts.values()} == {"train", "validation", "test", "external"}
    site = json.loads((root / "reports/eval/metrics.json").read_text())["external"]["sites"]["site_c"]
    assert contexts["site_c"]["sha256"] == site["sha256"] and contexts["site_c"]["mlflow.data.context"] == "external"
    assert contexts["phantom-test"]["images"] == str(summary["splits"]["test"]["n"])
    assert inputs["phantom-test"].dataset.digest == contexts["phantom-test"]["sha256"][:36]
    assert len({d.dataset.digest for d in inputs.values()}) == 4
    assert json.loads(inputs["phantom-train"].dataset.source) == {"tags": {"generator": "pipeline.data.phantom"}}
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "params.yaml", "dvc.lock", "eval", "explain", "train"} <= top
    # The model package is the run's logged MLflow Model, registered (a version per execution).
    assert record["model_version"] == "1" and client.get_logged_model(record["model_id"]).source_run_id == run.info.run_id
    # Artifacts live beside the store, not in the working directory.
    assert (mlflow_store / "mlartifacts" / run.info.run_id / "artifacts" / "report.html").is_file()


def test_metric_names_from_class_names_are_valid_stable_and_distinct():
    from mlflow.utils.validation import validate_param_and_metric_name

    names = [*AWKWARD_CLASS_NAMES, "covid-", "covid_", "a.b", "a_b", "", "normal"]
    keys = [mlflow_adapter.metric_key(("test", "per_class_imbalanced", n, "f1")) for n in names]
    assert all(validate_param_and_metric_name(k) for k in keys)
    assert len(set(keys)) == len(keys)
    assert keys == [mlflow_adapter.metric_key(("test", "per_class_imbalanced", n, "f1")) for n in names]
    assert all(k.count(".") == 3 for k in keys)  # a dot in a name never adds a level
    assert keys[-1] == "test.per_class_imbalanced.normal.f1" and "正常" in keys[2]
    assert mlflow_adapter.metric_key(("test", "roc_auc")) == "test.roc_auc"


def test_track_logs_awkward_class_names_with_the_mapping(rgb_run, mlflow_store):
    from mlflow.tracking import MlflowClient

    root, params = rgb_run
    record = track.run(params, root, root / "reports/mlflow_run.json")
    client = MlflowClient(f"sqlite:///{mlflow_store}/mlflow.db")
    run = client.get_run(record["run_id"])
    renamed = json.loads((mlflow_store / "mlartifacts" / run.info.run_id / "artifacts" / track.METRIC_NAMES).read_text())
    assert "test.per_class_imbalanced.<img src=x onerror=alert(1)>.f1" in renamed.values()
    for name, dotted in renamed.items():
        assert name in run.data.metrics and run.data.metrics[name] is not None
    assert "test.per_class_imbalanced.正常.f1" in run.data.metrics  # valid as it is: kept
