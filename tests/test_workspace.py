"""The project copy that make verify, the benchmarks and the end-to-end tests run in."""

from __future__ import annotations

import subprocess

from pipeline.core import kernels
from pipeline.core.workspace import REPO, copy_project, stage_outputs


def test_a_copy_logs_to_its_own_store_and_holds_no_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://team-server:5000")
    monkeypatch.setenv("DVC_EXP_NAME", "someone-elses-experiment")
    env = copy_project(tmp_path / "copy", {"train.epochs": 3, "data.path": "../shared/data/x.npz"})
    assert "MLFLOW_TRACKING_URI" not in env and "DVC_EXP_NAME" not in env
    assert not set(kernels.PORTABLE_ENV) & set(env)  # the copy's own code pins its kernels
    assert env["PYTHONPATH"] == str(tmp_path / "copy")
    copy = tmp_path / "copy"
    assert not (copy / "dvc.lock").exists()
    assert not any((copy / out).exists() for out in stage_outputs(copy))  # committed metrics files left out
    params = (copy / "params.yaml").read_text()
    assert "epochs: 3" in params and str((REPO / "../shared/data/x.npz").resolve()) in params
    status = subprocess.run(["git", "status", "--porcelain"], cwd=copy, capture_output=True, text=True, env=env)
    assert status.returncode == 0 and status.stdout == ""  # committed, clean
