"""Data-parallel training for real: two gloo workers under torch.distributed.run on this CPU.

Against one process on the same data and params (GroupNorm, whose statistics do not depend on
how a batch is shared out): the first epoch's loss to 1e-4 and the validation AUC to 0.01; two
runs of two workers give the same bytes; an interrupted two-worker run resumes to those bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY, first_epoch_loss, run_stages, tiny_params, write_params

pytestmark = pytest.mark.slow

GROUP = {"train.norm": "group", "train.epochs": 3, "train.patience": 3}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The tiny phantom, prepared and balanced once."""
    root = tmp_path_factory.mktemp("ddp-data")
    run_stages(root, tiny_params(root, **GROUP), ("prepare", "balance"))
    return root / "data"


def train(data: Path, folder: Path, processes: int, wait: bool = True, **changes: object) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "data").exists():
        shutil.copytree(data, folder / "data")
    write_params(folder / "params.yaml", {**TINY, **GROUP, "train.processes": processes, **changes})
    process = subprocess.Popen([sys.executable, "-m", "pipeline.train"], cwd=folder, start_new_session=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = process.communicate(timeout=600)
        assert process.returncode == 0, out
    return process


def best_val_auc(folder: Path) -> float:
    return json.loads((folder / "reports/train/metrics.json").read_text())["train"]["val_roc_auc"]


def test_two_workers_match_one_process_and_repeat_exactly(data, tmp_path):
    train(data, tmp_path / "one", 1)
    train(data, tmp_path / "two", 2)
    train(data, tmp_path / "again", 2)
    losses = [first_epoch_loss(tmp_path / run / "reports/train/history.csv") for run in ("one", "two")]
    assert abs(losses[1] - losses[0]) <= 1e-4
    assert abs(best_val_auc(tmp_path / "two") - best_val_auc(tmp_path / "one")) <= 0.01
    assert (tmp_path / "two/models/network.pt").read_bytes() == (tmp_path / "again/models/network.pt").read_bytes()
    timing = json.loads((tmp_path / "two/reports/train/timing.json").read_text())
    assert timing["processes"] == 2


def test_an_interrupted_two_worker_run_resumes_to_the_same_bytes(data, tmp_path):
    longer = {"train.epochs": 12, "train.patience": 12}  # time to be interrupted after the first checkpoint
    train(data, tmp_path / "whole", 2, **longer)
    checkpoint = tmp_path / "cut/models/checkpoints/last.pt"
    process = train(data, tmp_path / "cut", 2, wait=False, **longer)
    deadline = time.monotonic() + 300
    while not checkpoint.exists():  # written (atomically) by the first worker after each epoch
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # torchrun and both workers, mid-training
    process.wait()
    epochs_done = len(json.loads(torch.load(checkpoint, weights_only=True)["history"]))
    assert not (tmp_path / "cut/models/network.pt").exists() and 1 <= epochs_done < 12
    train(data, tmp_path / "cut", 2, **longer)
    assert (tmp_path / "cut/models/network.pt").read_bytes() == (tmp_path / "whole/models/network.pt").read_bytes()
    assert not checkpoint.exists()


def test_two_workers_train_findings_as_one_process(tmp_path_factory, tmp_path):
    """Multi-label data: the positive-weighted, masked loss shared out over two workers is the
    loss of one process."""
    root = tmp_path_factory.mktemp("ddp-multilabel")
    run_stages(root, tiny_params(root, **GROUP, **{"data.phantom.task": "multilabel"}), ("prepare", "balance"))
    changes = {"data.phantom.task": "multilabel", "train.epochs": 1}  # the first epoch's loss is what is compared
    train(root / "data", tmp_path / "one", 1, **changes)
    train(root / "data", tmp_path / "two", 2, **changes)
    losses = [first_epoch_loss(tmp_path / run / "reports/train/history.csv") for run in ("one", "two")]
    assert abs(losses[1] - losses[0]) <= 1e-4
