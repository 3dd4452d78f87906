"""train: determinism, early stopping, history and checkpoint contents."""

import csv
import dataclasses
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline import tasks, train
from pipeline.core.config import TrainParams, effective_train
from pipeline.core.files import read_json
from pipeline.modeling.networks import ModelConfig, build_model
from pipeline.modeling.recipe import make_optimizer
from tests.conftest import run_train, tiny_params


def tiny_params_train(**changes) -> TrainParams:
    return dataclasses.replace(tiny_params(Path(tempfile.mkdtemp())).train, **changes)


def test_same_params_and_seed_give_identical_bytes(balanced):
    run_train(balanced, "a")
    run_train(balanced, "b", **{"train.workers": 2})  # batches read by two DataLoader processes
    for name in ("model.pt", "metrics.json", "history.csv"):
        assert (balanced / "a" / name).read_bytes() == (balanced / "b" / name).read_bytes(), name
    run_train(balanced, "c", seed=7)
    assert (balanced / "a" / "model.pt").read_bytes() != (balanced / "c" / "model.pt").read_bytes()


def test_history_checkpoint_and_metrics(balanced):
    metrics = run_train(balanced, "out", **{"train.epochs": 3, "train.patience": 3})["train"]
    with open(balanced / "out" / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(train.HISTORY_COLUMNS)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    best = max(rows, key=lambda r: float(r["val_roc_auc"]))
    assert metrics["best_epoch"] == int(best["epoch"])
    assert metrics["val_roc_auc"] == pytest.approx(float(best["val_roc_auc"]))
    checkpoint = torch.load(balanced / "out" / "model.pt", weights_only=True)
    assert checkpoint["class_names"] == ["normal", "lesion"] and checkpoint["best_epoch"] == metrics["best_epoch"]
    assert read_json(balanced / "out" / "timing.json")["seconds"] > 0


def test_early_stopping_stops_and_a_run_that_learned_nothing_says_so(balanced, caplog):
    # With a vanishing learning rate (and no batch-norm statistics to update) the validation
    # AUC cannot improve after epoch 1, and the training loss stays where it started.
    metrics = run_train(balanced, "out", **{"train.epochs": 10, "train.patience": 2, "train.lr": 1e-12,
                                             "train.optimizer": "sgd", "train.momentum": 0.0,
                                             "train.model": "seed_cnn"})["train"]
    assert metrics["epochs_run"] == 3 and metrics["best_epoch"] == 1
    assert metrics["chance_loss"] == pytest.approx(0.693147, abs=1e-6)  # ln 2: two classes, cross-entropy
    assert metrics["left_chance"] is False and metrics["improved_after_first_epoch"] is False
    assert "the training loss never left chance" in caplog.text and "never beat the first epoch" in caplog.text


def test_a_run_that_learns_leaves_chance():
    history = [{"train_loss": 0.69}, {"train_loss": 0.40}]
    checks = train.learning_checks(history, best_epoch=2, chance=0.6931)
    assert checks == {"chance_loss": 0.6931, "min_train_loss": 0.4, "left_chance": True,
                      "improved_after_first_epoch": True}
    assert train.learning_checks(history[:1], 1, 0.6931)["improved_after_first_epoch"] is None  # one epoch: no verdict
    cfg = tiny_params_train(loss="focal", focal_gamma=2.0)
    assert tasks.for_data("binary", ["a", "b"]).chance_loss(cfg) == pytest.approx(0.25 * math.log(2), abs=1e-6)  # (1 - 1/K)^γ ln K


@pytest.mark.parametrize("model", ["seed_cnn", "small_cnn", "resnet18"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_every_model_and_optimizer_fits_a_batch(model, optimizer):
    """Each network learns with each optimiser: 30 steps on one fixed batch of 16 images drive its
    loss well below where it started (a broken network, optimiser or recipe entry stays put)."""
    cfg = tiny_params_train(model=model, optimizer=optimizer, lr=0.01 if optimizer == "sgd" else 0.003)
    net = build_model(ModelConfig(model, 1, 2, 16, 4, 0.5, 0.25))
    optimizer_ = make_optimizer(net, cfg)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 16, 16, generator=generator), torch.arange(16) % 2
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(net(x), y)
        optimizer_.zero_grad()
        loss.backward()
        optimizer_.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (model, optimizer, losses[0], losses[-1])


def test_stages_compute_with_deterministic_pinned_kernels():
    from threadpoolctl import threadpool_info

    from pipeline.core.runtime import configure_torch

    configure_torch(1)
    assert torch.are_deterministic_algorithms_enabled() and not torch._C._get_nnpack_enabled()
    assert torch.get_num_threads() == 1
    assert all(pool["num_threads"] == 1 for pool in threadpool_info() if pool["user_api"] == "blas")
    assert make_optimizer(build_model(ModelConfig("small_cnn", 1, 2, 16, 4, 0.5, 0.25)),
                          effective_train(tiny_params_train(), None)).defaults.get("fused") is True  # AdamW's sqrt not in MKL's VML


# The weight average, and with DP-SGD the accountant and the noise generator, are part of the
# state that must resume.
PRIVATE = {"train.privacy.enabled": True, "train.norm": "group"}


@pytest.mark.parametrize("private", [False, True], ids=["sgd", "dp-sgd"])
def test_interrupted_run_resumes_to_the_same_bytes(balanced, monkeypatch, private):
    changes = {"train.epochs": 4, "train.patience": 4, "train.aug_rotate": 5.0, "train.schedule": "cosine",
               "train.ema": 0.9, **(PRIVATE if private else {})}
    params = tiny_params(balanced, **changes)
    args = (balanced / "prepared", balanced / "balanced")
    train.run(params, *args, balanced / "full" / "model.pt", balanced / "full", balanced / "full" / "last.pt")
    assert not (balanced / "full" / "last.pt").exists()  # removed once training finished

    real_epoch, calls = train.train_epoch, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C during epoch 3
        return real_epoch(*a, **kw)

    monkeypatch.setattr(train, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.run(params, *args, balanced / "resumed" / "model.pt", balanced / "resumed", balanced / "resumed" / "last.pt")
    saved = torch.load(balanced / "resumed" / "last.pt", weights_only=True)
    assert len(json.loads(saved["history"])) == 2
    monkeypatch.setattr(train, "train_epoch", real_epoch)
    train.run(params, *args, balanced / "resumed" / "model.pt", balanced / "resumed", balanced / "resumed" / "last.pt")
    for name in ("model.pt", "history.csv", "metrics.json"):
        assert (balanced / "full" / name).read_bytes() == (balanced / "resumed" / name).read_bytes(), name


def test_checkpoint_of_other_params_is_ignored(balanced):
    params = tiny_params(balanced, **{"train.epochs": 2})
    ckpt = balanced / "c" / "last.pt"
    train.save_progress(ckpt, {"fingerprint": "something else"})
    assert train.load_progress(ckpt, "expected") is None
    train.run(params, balanced / "prepared", balanced / "balanced", balanced / "c" / "model.pt", balanced / "c", ckpt)
    assert (balanced / "c" / "model.pt").exists() and not ckpt.exists()
