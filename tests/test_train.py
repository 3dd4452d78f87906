"""train: determinism, early stopping, history and checkpoint contents."""

import csv
import json

import pytest
import torch

from pipeline import train
from pipeline.core.files import read_json
from tests.conftest import run_train, tiny_params


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


def test_early_stopping_stops(balanced):
    # With a vanishing learning rate (and no batch-norm statistics to update) the validation
    # AUC cannot improve after epoch 1.
    metrics = run_train(balanced, "out", **{"train.epochs": 10, "train.patience": 2, "train.lr": 1e-12,
                                             "train.optimizer": "sgd", "train.momentum": 0.0,
                                             "train.model": "seed_cnn"})["train"]
    assert metrics["epochs_run"] == 3 and metrics["best_epoch"] == 1


@pytest.mark.parametrize("model", ["seed_cnn", "small_cnn"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_models_and_optimizers_train(balanced, model, optimizer):
    metrics = run_train(balanced, "out", **{"train.model": model, "train.optimizer": optimizer, "train.epochs": 1})
    assert metrics["train"]["epochs_run"] == 1 and metrics["train"]["parameters"] > 0


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
