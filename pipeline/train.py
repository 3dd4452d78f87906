"""Stage 3, train: fit the configured CNN, keep the checkpoint with the best validation AUC.

Writes ``models/network.pt`` (state_dict + network config, loadable with
``torch.load(weights_only=True)``; evaluate wraps it into the model package
``models/model.pt``), ``reports/train/history.csv`` (per-epoch train/val loss, accuracy and
AUC), ``reports/train/metrics.json``, ``reports/train/curves.png`` and
``reports/train/timing.json`` (wall time lives apart from metrics so metrics stay
byte-identical between runs).

Data are streamed: batches are read from the prepared ``.npy`` files by the balance stage's
indices (:mod:`pipeline.modeling.loader`, ``train.workers`` processes reading ahead), so
memory holds a few batches, never the training set. ``train.processes: N`` trains on N
data-parallel workers (PyTorch DDP under ``torch.distributed.run``; see
:mod:`pipeline.modeling.distributed` for how a batch is shared).

Determinism: one seeded ``torch.Generator`` drives shuffling, sampling and augmentation, in
the training process (every worker draws the same), thread count comes from params,
deterministic kernels are requested: same params + seed ⇒ same bytes on CPU, whatever
``train.workers``. Resumable: every epoch's full state goes to ``models/checkpoints/last.pt``
(not a DVC output, so DVC never deletes it); rerunning after an interruption continues there.
"""

from __future__ import annotations

import argparse
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

from pipeline.core import kernels, paths
from pipeline.core.config import Params, TrainParams, as_dict, load_params
from pipeline.core.dataset import BALANCED_FILES, TrainingSet, load_meta, load_split, load_training_set
from pipeline.core.errors import PipelineError
from pipeline.core.files import SECONDS_DECIMALS, file_digest, rounded, write_csv, write_json
from pipeline.core.runtime import (
    configure_logging,
    configure_torch,
    device_name,
    run_command,
    seed_everything,
    select_device,
)
from pipeline.evaluation.metrics import roc_auc
from pipeline.modeling import distributed, dp_sgd, loader
from pipeline.modeling.checkpoints import load_progress, save_checkpoint, save_progress
from pipeline.modeling.distributed import World
from pipeline.modeling.networks import Classifier, ModelConfig, build_model, count_parameters, predict_proba
from pipeline.modeling.recipe import (
    WeightAverage,
    augment,
    epoch_order,
    layout,
    lr_factor,
    make_loss,
    make_optimizer,
    precision,
)
from pipeline.reporting.plots import plot_history

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "train_loss", "train_accuracy", "train_roc_auc", "val_loss", "val_accuracy", "val_roc_auc")


def train_epoch(model: nn.Module, data: TrainingSet, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                cfg: TrainParams, generator: torch.Generator, device: torch.device, epoch: int,
                average: WeightAverage | None = None, world: World = distributed.ALONE,
                private: dp_sgd.PrivateTraining | None = None) -> dict[str, float | None]:
    """One pass over the training set in a seeded order (permutation or class-balanced draw), with
    seeded augmentation and the per-step learning rate; loss/accuracy/AUC as seen in training.
    ``average``, when given, is updated after every optimiser step. With several workers,
    each trains on its share of every batch (see :mod:`pipeline.modeling.distributed`). With
    ``private``, batches are DP-SGD's Poisson samples (an empty draw is skipped: nothing is
    released for it) and the loss is the batch's weighted mean, which Opacus clips per image."""
    model.train()
    labels = torch.from_numpy(data.labels)
    if private is not None:
        chunks = [chunk for chunk in private.batches() if len(chunk)]
    else:
        order = epoch_order(labels, cfg.sampler, generator).numpy()
        chunks = [order[start:start + cfg.batch_size] for start in range(0, len(order), cfg.batch_size)]
    if world.size > 1 and len(chunks[-1]) < world.size:
        chunks.pop()  # nobody could take an empty share
    shares = [world.share(chunk) for chunk in chunks]
    weight = loss_fn.weight
    total_loss, probs, positions = 0.0, [], []
    stream = loader.batches(data, [share for share, _ in shares], cfg.workers)
    for b, (chunk, (share, rows), (images, y)) in enumerate(tqdm(zip(chunks, shares, stream), total=len(chunks),
                                                                 desc=f"epoch {epoch}", leave=False, disable=None)):
        x = augment(images.to(device).float().div_(255.0), cfg, generator, rows, len(chunk))
        x = x.contiguous(memory_format=layout(cfg, x.ndim - 2))
        y = y.to(device)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(cfg, (epoch - 1) * len(chunks) + b, cfg.epochs * len(chunks))
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision(cfg, device) == "bf16"):
            logits = model(x)
            # The batch's weighted mean loss, shared out: this worker's weighted sum over the
            # weight of the whole batch (known to all from the labels), times the number of
            # workers, whose gradients DDP averages.
            batch_weight = float(weight[labels[chunk]].sum())
            summed = loss_fn(logits.float(), y).sum()
            loss = summed / len(chunk) if private else summed * (world.size / batch_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if average is not None:
            average.update(average.source)
        total_loss += summed.item() * len(chunk) / batch_weight  # .item() syncs with the device; once per batch
        probs.append(torch.softmax(logits.detach(), dim=1).double().cpu().numpy())
        positions.append(share)
    seen_probs = world.gather(np.concatenate(probs))
    seen = data.labels[world.gather(np.concatenate(positions))]
    return {
        "loss": world.total(total_loss) / sum(len(chunk) for chunk in chunks),
        "accuracy": float((seen_probs.argmax(1) == seen).mean()),
        "roc_auc": roc_auc(seen, seen_probs),
    }


def evaluate_split(model: Classifier, images: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                   device: torch.device) -> dict[str, float | None]:
    """Validation loss (class-weighted cross-entropy of the probabilities, as training weighs its
    loss), accuracy and ROC AUC. The logarithm is numpy's, in float64: ``torch.log`` runs in MKL's
    vector math, whose last bits differ between CPU vendors (see :mod:`pipeline.core.kernels`)."""
    probs = predict_proba(model, images, device=device)
    weight = np.asarray(weights, dtype=np.float64)[labels]
    picked = np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))
    loss = float(-(weight * picked).sum() / weight.sum())
    return {"loss": loss, "accuracy": float((probs.argmax(1) == labels).mean()), "roc_auc": roc_auc(labels, probs)}


# Training "left chance" when its loss fell below this share of the loss of uniform predictions.
LEFT_CHANCE = 0.95


def chance_loss(cfg: TrainParams, num_classes: int) -> float:
    """The training loss of a model that predicts every class with probability 1/K: ln K for
    cross-entropy (class weights and label smoothing leave it so), less for focal loss."""
    loss = make_loss(cfg, torch.ones(num_classes))(torch.zeros(1, num_classes), torch.zeros(1, dtype=torch.long))
    return float(loss.sum())


def learning_checks(history: list[dict[str, Any]], best_epoch: int, chance: float) -> dict[str, Any]:
    """Whether training learned at all, from its own history: the lowest training loss against
    chance, and whether validation ever beat the first epoch (None after one epoch). The report
    turns a failed check into a limitation; ``train`` logs a warning."""
    lowest = min(row["train_loss"] for row in history)
    checks = {"chance_loss": rounded(chance), "min_train_loss": rounded(lowest),
              "left_chance": bool(lowest < LEFT_CHANCE * chance),
              "improved_after_first_epoch": bool(best_epoch > 1) if len(history) > 1 else None}
    if not checks["left_chance"]:
        log.warning("the training loss never left chance: lowest %.4f against %.4f for uniform predictions "
                    "(try another train.lr or train.norm recipe)", lowest, chance)
    if checks["improved_after_first_epoch"] is False:
        log.warning("validation never beat the first epoch: the kept model is epoch 1's")
    return checks


def fingerprint(params: Params, prepared: Path, balanced: Path) -> str:
    """What a checkpoint must match to be resumed: training params, seed and the exact data (the
    prepared arrays' digest that prepare records, and the balance stage's files)."""
    digest = hashlib.sha256(json.dumps([as_dict(params.train), params.seed, load_meta(prepared)["arrays_sha256"],
                                        [file_digest(balanced / name) for name in BALANCED_FILES]]).encode())
    return digest.hexdigest()


def standardisation(data: TrainingSet, chunk: int = 64) -> tuple[float, float]:
    """Mean and standard deviation of the training images' pixels on [0, 1], from a histogram of
    the uint8 values (exact integer sums). Read ``chunk`` images at a time: bincount widens its
    input to int64, eight times the chunk's bytes."""
    counts = np.zeros(256, dtype=np.int64)
    for start in range(0, len(data), chunk):
        counts += np.bincount(data[start:start + chunk].ravel(), minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    total = int(counts.sum())
    mean = float(counts @ values) / total
    return mean, math.sqrt(max(float(counts @ values**2) / total - mean**2, 0.0))


def fit(params: Params, data: TrainingSet, val: dict[str, Any], meta: dict[str, Any], key: str,
        device: torch.device, checkpoint: Path | None = None, world: World = distributed.ALONE
        ) -> tuple[Classifier, list[dict[str, Any]], int, dict[str, Any] | None]:
    """Train on ``device`` with early stopping on validation AUC; returns the best model,
    history, best epoch and, with ``train.privacy.enabled``, the DP-SGD guarantee spent (None
    otherwise).

    After every epoch the whole training state (weights, optimiser, random generator, history,
    best weights) is saved to ``checkpoint`` (by the first worker); a run interrupted (Ctrl-C,
    kill) and started again with the same params and data (``key``) resumes there and ends with
    the same bytes as an uninterrupted run.
    """
    cfg = params.train
    dp_sgd.check(params)
    configure_torch(max(1, cfg.threads // world.size))
    size = meta["image_size"]  # [H, W], or [D, H, W] for volumes
    if cfg.model == "seed_cnn" and len(set(size)) != 1:
        raise PipelineError(f"train.model=seed_cnn needs square images (cubic volumes), got {'x'.join(map(str, size))}")
    generator = torch.Generator().manual_seed(params.seed)
    mean, std = standardisation(data)
    config = ModelConfig(name=cfg.model, in_channels=meta["channels"], num_classes=meta["num_classes"],
                         image_size=size[0], width=cfg.width, mean=rounded(mean), std=rounded(std) or 1.0,
                         norm=cfg.norm, ndim=len(size))
    torch.manual_seed(params.seed)  # weight initialisation draws from the global generator
    network = build_model(config).to(device, memory_format=layout(cfg, len(size)))
    model = network if world.size == 1 else nn.parallel.DistributedDataParallel(
        network, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(model, cfg)
    private = None
    if cfg.privacy.enabled:
        private = dp_sgd.make_private(params, network, optimizer, len(data), generator)
        model, optimizer = private.model, private.optimizer
    train_loss = make_loss(cfg, torch.tensor(data.weights, dtype=torch.float32, device=device))
    history: list[dict[str, Any]] = []
    best_auc, best_epoch, best_state = -math.inf, 0, None
    # With train.ema the weight average is what gets validated, kept and saved.
    average = WeightAverage(network, cfg.ema) if cfg.ema else None
    evaluated = average.model if average else network
    state = load_progress(checkpoint, key) if checkpoint else None
    if state:
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if average:
            average.load_state_dict(state["average"])
        generator.set_state(state["generator"])
        if private:
            private.load_state_dict(state["privacy"])
        history, best_auc, best_epoch = json.loads(state["history"]), state["best_auc"], state["best_epoch"]
        best_state = state["best_model"]
        log.info("resuming from the checkpoint of epoch %d (%s)", len(history), checkpoint)
    epoch = len(history)
    while epoch < cfg.epochs and not (history and epoch - best_epoch >= cfg.patience):
        epoch += 1
        tr = train_epoch(model, data, train_loss, optimizer, cfg, generator, device, epoch, average, world, private)
        va = evaluate_split(evaluated, val["images"], val["labels"], data.weights, device)
        history.append({"epoch": epoch, **{f"train_{k}": v for k, v in tr.items()}, **{f"val_{k}": v for k, v in va.items()}})
        auc = va["roc_auc"] if va["roc_auc"] is not None else -va["loss"]
        improved = auc > best_auc
        if improved:
            best_auc, best_epoch, best_state = auc, epoch, copy.deepcopy(evaluated.state_dict())
        log.info("epoch %d/%d  train loss %.4f auc %s | val loss %.4f acc %.4f auc %s%s", epoch, cfg.epochs,
                 tr["loss"], _fmt(tr["roc_auc"]), va["loss"], va["accuracy"], _fmt(va["roc_auc"]), "  *best" if improved else "")
        if checkpoint and world.is_main:
            save_progress(checkpoint, {"fingerprint": key, "model": network.state_dict(),
                                       "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                                       "history": json.dumps(history), "best_auc": best_auc, "best_epoch": best_epoch,
                                       "best_model": best_state, **({"average": average.state_dict()} if average else {}),
                                       **({"privacy": private.state_dict()} if private else {})})
    if epoch < cfg.epochs:
        log.info("early stopping: no validation AUC gain for %d epochs", cfg.patience)
    guarantee = None
    if private:
        guarantee = private.guarantee()
        private.release()
        log.info("DP-SGD spent ε = %.3f at δ = %.2e over %d steps", guarantee["epsilon"], guarantee["delta"],
                 guarantee["steps"])
    network.load_state_dict(best_state)
    return network.to("cpu", memory_format=torch.contiguous_format), history, best_epoch, guarantee


def run(params: Params, prepared: Path = paths.PREPARED, balanced: Path = paths.BALANCED,
        model_path: Path = paths.NETWORK, out_dir: Path = paths.TRAIN_DIR,
        checkpoint: Path | None = paths.CHECKPOINT, world: World = distributed.ALONE) -> dict[str, Any]:
    meta = load_meta(prepared)
    data = load_training_set(prepared, balanced)
    val = load_split(prepared, "val")
    log.info("training %s on %d images (%s), validating on %d%s", params.train.model, len(data),
             np.bincount(data.labels).tolist(), len(val["labels"]),
             f", worker {world.rank + 1} of {world.size}" if world.size > 1 else "")
    device = world.device or select_device(params.train.device)  # torchrun's worker has its own GPU
    start = time.perf_counter()
    model, history, best_epoch, guarantee = fit(params, data, val, meta, fingerprint(params, prepared, balanced),
                                                device, checkpoint, world)
    seconds = time.perf_counter() - start
    best = history[best_epoch - 1]
    metrics = {"train": {
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "parameters": count_parameters(model),
        "val_roc_auc": rounded(best["val_roc_auc"]),
        "val_accuracy": rounded(best["val_accuracy"]),
        "val_loss": rounded(best["val_loss"]),
        **learning_checks(history, best_epoch, chance_loss(params.train, meta["num_classes"])),
    }}
    if guarantee is not None:
        metrics["train"]["privacy"] = guarantee
    if not world.is_main:
        return metrics
    save_checkpoint(model_path, model, {"class_names": meta["class_names"], "best_epoch": best_epoch,
                                        **({"privacy": guarantee} if guarantee else {})})
    write_csv(out_dir / paths.HISTORY, HISTORY_COLUMNS, [[rounded(row[c]) for c in HISTORY_COLUMNS] for row in history])
    write_json(out_dir / paths.METRICS, metrics)
    write_json(out_dir / paths.TIMING, {"seconds": rounded(seconds, SECONDS_DECIMALS),
                                        "device": device_name(device),
                                        "precision": precision(params.train, device),
                                        "processes": world.size, "workers": params.train.workers,
                                        "images_per_second": rounded(len(data) * len(history) / seconds,
                                                                     SECONDS_DECIMALS),
                                        "kernels": kernels.record(max(1, params.train.threads // world.size))})
    plot_history(history, out_dir / paths.CURVES)
    if checkpoint and checkpoint.exists():
        checkpoint.unlink()  # finished: the next run starts fresh
    log.info("best epoch %d, val AUC %s, %d parameters, %.1f s", best_epoch, _fmt(best["val_roc_auc"]),
             metrics["train"]["parameters"], seconds)
    return metrics


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def main() -> None:
    """``python -m pipeline.train``: one process, or N under torchrun when ``train.processes`` is N."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", type=Path, help="params file (default: params.yaml)")
    args = parser.parse_args()
    configure_logging()

    def work() -> int:
        params = load_params(args.params)
        world = distributed.join(params.train.device)
        if params.train.processes > 1 and world.size == 1:
            log.info("starting %d data-parallel workers with torch.distributed.run", params.train.processes)
            return distributed.launch(params.train.processes, "pipeline.train", args.params)
        if world.size != params.train.processes:
            raise PipelineError(f"started as {world.size} workers but train.processes is {params.train.processes}")
        seed_everything(params.seed)
        try:
            run(params, world=world)
        finally:
            distributed.leave(world)
        return 0

    run_command(work)


if __name__ == "__main__":
    main()
