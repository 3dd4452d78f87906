"""Stage 3, train: fit the configured CNN, keep the checkpoint with the best validation AUC.

Writes ``models/network.pt`` (state_dict + network config, loadable with
``torch.load(weights_only=True)``; evaluate wraps it into the model package ``models/model.pt``), ``reports/train/history.csv`` (per-epoch train/val loss,
accuracy and AUC), ``reports/train/metrics.json``, ``reports/train/curves.png`` and
``reports/train/timing.json`` (wall time lives apart from metrics so metrics stay
byte-identical between runs).

Determinism: one seeded ``torch.Generator`` drives shuffling, sampling and augmentation, thread
count comes from params, deterministic kernels are requested: same params + seed ⇒ same bytes
on CPU. Resumable: every epoch's full state goes to ``models/checkpoints/last.pt`` (not a DVC
output, so DVC never deletes it); rerunning after an interruption continues from there.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.core import paths
from pipeline.core.config import Params, TrainParams, as_dict
from pipeline.core.dataset import load_meta, load_split, load_training_set
from pipeline.core.errors import PipelineError
from pipeline.core.files import SECONDS_DECIMALS, rounded, write_csv, write_json
from pipeline.core.runtime import configure_torch, select_device, stage_main
from pipeline.evaluation.metrics import roc_auc
from pipeline.modeling.checkpoints import load_progress, save_checkpoint, save_progress
from pipeline.modeling.networks import Classifier, ModelConfig, build_model, count_parameters, predict_proba
from pipeline.modeling.recipe import WeightAverage, augment, epoch_order, lr_factor, make_loss, make_optimizer
from pipeline.reporting.plots import plot_history

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "train_loss", "train_accuracy", "train_roc_auc", "val_loss", "val_accuracy", "val_roc_auc")


def train_epoch(model: Classifier, images: torch.Tensor, labels: torch.Tensor, loss_fn: nn.Module,
                optimizer: torch.optim.Optimizer, cfg: TrainParams, generator: torch.Generator,
                device: torch.device, epoch: int, average: WeightAverage | None = None) -> dict[str, float | None]:
    """One pass over the training set in a seeded order (permutation or class-balanced draw), with
    seeded augmentation and the per-step learning rate; loss/accuracy/AUC as seen in training.
    ``average``, when given, is updated after every optimiser step."""
    model.train()
    order = epoch_order(labels, cfg.sampler, generator)
    total_loss, probs = 0.0, []
    batches = range(0, len(order), cfg.batch_size)
    steps_per_epoch = len(batches)
    for b, start in enumerate(tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=None)):
        idx = order[start:start + cfg.batch_size]
        x = augment(images[idx].float().div_(255.0), cfg, generator).to(device)
        y = labels[idx].to(device)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(cfg, (epoch - 1) * steps_per_epoch + b, cfg.epochs * steps_per_epoch)
        # Mixed precision (bfloat16) on a GPU only; the CPU path stays float32 and deterministic.
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if average is not None:
            average.update(model)
        total_loss += loss.item() * len(idx)  # .item() syncs with the device; once per batch is fine
        probs.append(torch.softmax(logits.detach(), dim=1).double().cpu())
    seen = labels[order].numpy()
    probs_np = torch.cat(probs).numpy()
    return {
        "loss": total_loss / len(order),
        "accuracy": float((probs_np.argmax(1) == seen).mean()),
        "roc_auc": roc_auc(seen, probs_np),
    }


def evaluate_split(model: Classifier, images: np.ndarray, labels: np.ndarray, loss_fn: nn.Module,
                   device: torch.device) -> dict[str, float | None]:
    probs = predict_proba(model, images, device=device)
    loss = loss_fn(torch.log(torch.from_numpy(probs).float().clamp_min(1e-12)).to(device),
                   torch.from_numpy(labels).to(device))
    return {"loss": float(loss), "accuracy": float((probs.argmax(1) == labels).mean()), "roc_auc": roc_auc(labels, probs)}


def fingerprint(params: Params, images: np.ndarray, labels: np.ndarray, val: dict[str, np.ndarray]) -> str:
    """What a checkpoint must match to be resumed: training params, seed and the exact data."""
    digest = hashlib.sha256(json.dumps([as_dict(params.train), params.seed]).encode())
    for array in (images, labels, val["images"], val["labels"]):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def fit(params: Params, images: np.ndarray, labels: np.ndarray, weights: list[float], val: dict[str, np.ndarray],
        meta: dict[str, Any], checkpoint: Path | None = None) -> tuple[Classifier, list[dict[str, Any]], int]:
    """Train with early stopping on validation AUC; returns the best model, history, best epoch.

    After every epoch the whole training state (weights, optimiser, random generator, history,
    best weights) is saved to ``checkpoint``; a run interrupted (Ctrl-C, kill) and started again
    with the same params and data resumes there and ends with the same bytes as an
    uninterrupted run.
    """
    cfg = params.train
    configure_torch(cfg.threads)
    device = select_device(cfg.device)
    height, width = meta["image_size"]
    if cfg.model == "seed_cnn" and height != width:
        raise PipelineError(f"train.model=seed_cnn needs square images, got {height}x{width}")
    generator = torch.Generator().manual_seed(params.seed)
    scaled = images.astype(np.float64) / 255.0
    config = ModelConfig(name=cfg.model, in_channels=meta["channels"], num_classes=meta["num_classes"],
                         image_size=height, width=cfg.width, mean=rounded(float(scaled.mean())),
                         std=rounded(float(scaled.std()) or 1.0))
    torch.manual_seed(params.seed)  # weight initialisation draws from the global generator
    model = build_model(config).to(device)
    optimizer = make_optimizer(model, cfg)
    # Validation loss: weighted cross-entropy over log-probabilities.
    weight = torch.tensor(weights, dtype=torch.float32, device=device)
    train_loss = make_loss(cfg, weight)
    val_loss = nn.NLLLoss(weight=weight)
    # Kept as N×C×H×W uint8 (4× smaller than float); each batch is scaled to [0, 1] on the fly.
    x_train = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    y_train = torch.from_numpy(labels)
    history: list[dict[str, Any]] = []
    best_auc, best_epoch, best_state = -math.inf, 0, None
    # With train.ema the weight average is what gets validated, kept and saved.
    average = WeightAverage(model, cfg.ema) if cfg.ema else None
    evaluated = average.model if average else model
    key = fingerprint(params, images, labels, val)
    state = load_progress(checkpoint, key) if checkpoint else None
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if average:
            average.load_state_dict(state["average"])
        generator.set_state(state["generator"])
        history, best_auc, best_epoch = json.loads(state["history"]), state["best_auc"], state["best_epoch"]
        best_state = state["best_model"]
        log.info("resuming from the checkpoint of epoch %d (%s)", len(history), checkpoint)
    epoch = len(history)
    while epoch < cfg.epochs and not (history and epoch - best_epoch >= cfg.patience):
        epoch += 1
        tr = train_epoch(model, x_train, y_train, train_loss, optimizer, cfg, generator, device, epoch, average)
        va = evaluate_split(evaluated, val["images"], val["labels"], val_loss, device)
        history.append({"epoch": epoch, **{f"train_{k}": v for k, v in tr.items()}, **{f"val_{k}": v for k, v in va.items()}})
        auc = va["roc_auc"] if va["roc_auc"] is not None else -va["loss"]
        improved = auc > best_auc
        if improved:
            best_auc, best_epoch, best_state = auc, epoch, copy.deepcopy(evaluated.state_dict())
        log.info("epoch %d/%d  train loss %.4f auc %s | val loss %.4f acc %.4f auc %s%s", epoch, cfg.epochs,
                 tr["loss"], _fmt(tr["roc_auc"]), va["loss"], va["accuracy"], _fmt(va["roc_auc"]), "  *best" if improved else "")
        if checkpoint:
            save_progress(checkpoint, {"fingerprint": key, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                       "generator": generator.get_state(), "history": json.dumps(history),
                                       "best_auc": best_auc, "best_epoch": best_epoch, "best_model": best_state,
                                       **({"average": average.state_dict()} if average else {})})
    if epoch < cfg.epochs:
        log.info("early stopping: no validation AUC gain for %d epochs", cfg.patience)
    model.load_state_dict(best_state)
    return model.cpu(), history, best_epoch


def run(params: Params, prepared: Path = paths.PREPARED, balanced: Path = paths.BALANCED,
        model_path: Path = paths.NETWORK, out_dir: Path = paths.TRAIN_DIR,
        checkpoint: Path | None = paths.CHECKPOINT) -> dict[str, Any]:
    meta = load_meta(prepared)
    images, labels, weights = load_training_set(prepared, balanced)
    val = load_split(prepared, "val")
    log.info("training %s on %d images (%s), validating on %d", params.train.model, len(labels),
             np.bincount(labels).tolist(), len(val["labels"]))
    start = time.perf_counter()
    model, history, best_epoch = fit(params, images, labels, weights, val, meta, checkpoint)
    seconds = time.perf_counter() - start
    best = history[best_epoch - 1]
    metrics = {"train": {
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "parameters": count_parameters(model),
        "val_roc_auc": rounded(best["val_roc_auc"]),
        "val_accuracy": rounded(best["val_accuracy"]),
        "val_loss": rounded(best["val_loss"]),
    }}
    save_checkpoint(model_path, model, {"class_names": meta["class_names"], "best_epoch": best_epoch})
    write_csv(out_dir / paths.HISTORY, HISTORY_COLUMNS, [[rounded(row[c]) for c in HISTORY_COLUMNS] for row in history])
    write_json(out_dir / paths.METRICS, metrics)
    write_json(out_dir / paths.TIMING, {"seconds": rounded(seconds, SECONDS_DECIMALS),
                                        "device": str(select_device(params.train.device)),
                                        "images_per_second": rounded(len(labels) * len(history) / seconds, SECONDS_DECIMALS)})
    plot_history(history, out_dir / paths.CURVES)
    if checkpoint and checkpoint.exists():
        checkpoint.unlink()  # finished: the next run starts fresh
    log.info("best epoch %d, val AUC %s, %d parameters, %.1f s", best_epoch, _fmt(best["val_roc_auc"]),
             metrics["train"]["parameters"], seconds)
    return metrics


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def main() -> None:
    stage_main(__doc__.splitlines()[0], run)


if __name__ == "__main__":
    main()
