"""The MLflow model: logged and registered by track, loaded by alias, promoted, served over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pipeline import promote, track
from pipeline.core.dataset import load_split
from pipeline.core.errors import PipelineError
from pipeline.modeling.package import load_package
from tests.conftest import free_port


@pytest.fixture(scope="module")
def registry(tiny_run, rgb_run, tmp_path_factory):
    """A store with two versions of 'medcnn': v1 the tiny phantom model, v2 the 5-class RGB one."""
    store = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.setenv("DVC_ROOT", str(store))
        records = [track.run(params, root, store / f"run{i}.json") for i, (root, params) in enumerate((tiny_run, rgb_run))]
        yield store, records, patch
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # mlflow.set_tracking_uri exports it


def test_track_registers_a_tagged_version_per_execution(registry, tiny_run):
    from mlflow.tracking import MlflowClient

    store, records, _ = registry
    assert [r["model_version"] for r in records] == ["1", "2"]
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    version = client.get_model_version("medcnn", "1")
    metrics = json.loads((tiny_run[0] / "reports/eval/metrics.json").read_text())["test"]
    assert version.tags["data.source"] == "phantom" and float(version.tags["test.roc_auc"]) == metrics["roc_auc"]
    assert version.tags["classes"] == json.dumps(["normal", "lesion"]) and version.tags["input_shape"] == "32x32x1"
    assert len(version.tags["git.commit"]) >= 4 and version.run_id == records[0]["run_id"]


def test_promote_then_load_by_alias_gives_the_packages_answers(registry, tiny_run, capsys):
    import mlflow

    store, _, _ = registry
    promote.promote("medcnn", "1")
    assert "'medcnn@champion' now points to version 1" in capsys.readouterr().out
    model = mlflow.pyfunc.load_model("models:/medcnn@champion")
    images = load_split(tiny_run[0] / "data/prepared", "test")["images"][:8]
    frame = model.predict(images)
    expected = load_package(tiny_run[0] / "models/model.pt").score(images)
    np.testing.assert_allclose(frame[["prob_normal", "prob_lesion"]].to_numpy(), expected.probabilities, atol=1e-9)
    assert list(frame["prediction"]) == [["normal", "lesion"][k] for k in expected.predictions]
    assert tuple(model.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 32, 32, 1)


def test_promote_refuses_another_class_list_unless_forced(registry, capsys):
    promote.promote("medcnn", "1")
    with pytest.raises(PipelineError, match="differs from the champion in classes"):
        promote.promote("medcnn")  # the newest, v2, has 5 classes and RGB input
    out = capsys.readouterr().out
    assert "v2" in out and "current champion (v1)" in out and "roc_auc" in out
    promote.promote("medcnn", force=True)
    assert "now points to version 2" in capsys.readouterr().out
    with pytest.raises(PipelineError, match="has no version 9"):
        promote.promote("medcnn", "9")
    promote.promote("medcnn", "1", force=True)


def test_served_endpoint_answers_like_the_package(registry, tiny_run):
    """`mlflow models serve` on the champion alias, a real HTTP request, the same probabilities."""
    store, _, _ = registry
    promote.promote("medcnn", "1", force=True)
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(["mlflow", "models", "serve", "-m", "models:/medcnn@champion", "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "server did not answer /ping within 120 s"
                time.sleep(0.5)
        images = load_split(tiny_run[0] / "data/prepared", "test")["images"][:4]
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": images.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # uvicorn workers share the group
        server.wait(timeout=30)
    expected = load_package(tiny_run[0] / "models/model.pt").score(images)
    np.testing.assert_allclose([[row["prob_normal"], row["prob_lesion"]] for row in answer], expected.probabilities,
                               atol=1e-9)
    assert [row["status"] for row in answer] == ["ok" if not f else "warning: out of distribution"
                                                 for f in expected.out_of_distribution]
