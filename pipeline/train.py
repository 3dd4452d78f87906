"""Stage 3, train: fit the configured CNN, keep the checkpoint with the best validation AUC.

Writes ``models/network.pt`` (state_dict + network config, loadable with
``torch.load(weights_only=True)``; evaluate wraps it into the model package
``models/model.pt``), ``reports/train/history.csv`` (per-epoch train/val loss, accuracy and
AUC), ``reports/train/metrics.json``, ``reports/train/curves.png`` and
``reports/train/timing.json`` (wall time lives apart from metrics so metrics stay
byte-identical between runs).

With ``cv.folds`` this stage trains nothing: the ``fold@<n>`` stages (:mod:`pipeline.fold`) ran
this training once per fold, and :func:`assemble` averages their models into one ensemble,
written to the same files.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline import tasks
from pipeline.core import kernels, paths
from pipeline.core.config import Params, TrainParams, as_dict, effective_train, load_params
from pipeline.core.dataset import BALANCED_FILES, TrainingSet, load_meta, load_split, load_training_set
from pipeline.core.errors import PipelineError
from pipeline.core.files import SECONDS_DECIMALS, file_digest, read_csv, read_json, rounded, write_csv, write_json
from pipeline.core.runtime import (
    configure_logging,
    configure_torch,
    device_name,
    run_command,
    seed_everything,
    select_device,
)
from pipeline.data.labels import counts
from pipeline.modeling import distributed, dp_sgd, loader, pretrained
from pipeline.modeling.checkpoints import load_checkpoint, load_progress, save_checkpoint, save_progress
from pipeline.modeling.distributed import World
from pipeline.modeling.networks import Classifier, Ensemble, ModelConfig, build_model, count_parameters, predict_proba
from pipeline.modeling.recipe import (
    WeightAverage,
    augment,
    epoch_order,
    layout,
    lr_factor,
    make_optimizer,
    precision,
)
from pipeline.reporting.plots import plot_history
from pipeline.tasks import Task

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "train_loss", "train_accuracy", "train_roc_auc", "val_loss", "val_accuracy", "val_roc_auc")


def history_columns(task: Task) -> tuple[str, ...]:
    """``history.csv``'s columns: loss and the task's per-epoch metrics, in training and validation
    (``HISTORY_COLUMNS`` for one class per image; ordinal tasks add kappa)."""
    return ("epoch", *[f"{split}_{metric}" for split in ("train", "val") for metric in ("loss", *task.epoch_metrics)])


def train_epoch(model: nn.Module, data: TrainingSet, task: Task, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                cfg: TrainParams, generator: torch.Generator, device: torch.device, epoch: int,
                average: WeightAverage | None = None, world: World = distributed.ALONE,
                private: dp_sgd.PrivateTraining | None = None) -> dict[str, float | None]:
    """One pass over the training set in a seeded order (permutation or class-balanced draw), with
    seeded augmentation and the per-step learning rate; loss and the task's metrics as seen in training.
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
            batch_weight = task.batch_weight(weight, labels[chunk])
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
        probs.append(task.probabilities(logits.detach().float()).double().cpu().numpy())
        positions.append(share)
    seen_probs = world.gather(np.concatenate(probs))
    seen = data.labels[world.gather(np.concatenate(positions))]
    return {"loss": world.total(total_loss) / sum(len(chunk) for chunk in chunks), **task.epoch_scores(seen, seen_probs)}


def evaluate_split(model: Classifier, task: Task, images: np.ndarray, labels: np.ndarray, weights: list[float],
                   device: torch.device) -> dict[str, float | None]:
    """Validation loss (the task's, weighted as training weighs its loss) and the task's metrics."""
    probs = predict_proba(model, images, device=device, activation=task.probabilities)
    return {"loss": task.validation_loss(labels, probs, weights), **task.epoch_scores(labels, probs)}


# Training "left chance" when its loss fell below this share of the loss of uniform predictions.
LEFT_CHANCE = 0.95


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


def effective(cfg: TrainParams, task: Task) -> TrainParams:
    """``train`` as it runs for ``task``: every ``auto`` resolved (:func:`effective_train`)."""
    return effective_train(cfg, task.name)


class Training:
    """One training run's state, built from params: the network (wrapped for DDP with several
    workers, for DP-SGD with ``train.privacy``), the optimiser, the loss, the seeded generator,
    the weight average (``train.ema``: what is validated, kept and saved), the history and the
    best epoch. Each option is one part of the state here, so :func:`fit` reads as the loop it is.
    """

    def __init__(self, params: Params, task: Task, data: TrainingSet, meta: dict[str, Any], device: torch.device,
                 world: World) -> None:
        cfg = effective(params.train, task)
        task.check(cfg)
        dp_sgd.check(params)
        configure_torch(max(1, cfg.threads // world.size))
        size = meta["image_size"]  # [H, W], or [D, H, W] for volumes
        if cfg.model == "seed_cnn" and len(set(size)) != 1:
            raise PipelineError(f"train.model=seed_cnn needs square images (cubic volumes), got "
                                f"{'x'.join(map(str, size))}")
        self.cfg, self.task, self.data, self.device, self.world = cfg, task, data, device, world
        self.generator = torch.Generator().manual_seed(params.seed)
        mean, std = standardisation(data)
        config = ModelConfig(name=cfg.model, in_channels=meta["channels"], num_classes=task.outputs(cfg),
                             image_size=size[0], width=cfg.width, mean=rounded(mean), std=rounded(std) or 1.0,
                             norm=cfg.norm, ndim=len(size))
        torch.manual_seed(params.seed)  # weight initialisation draws from the global generator
        network = build_model(config)
        self.pretrained = pretrained.load(network, cfg.pretrained) if cfg.pretrained.weights else None
        self.network = network.to(device, memory_format=layout(cfg, len(size)))
        self.model = self.network if world.size == 1 else nn.parallel.DistributedDataParallel(
            self.network, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = make_optimizer(self.model, cfg)
        self.private = dp_sgd.make_private(params, self.network, self.optimizer, len(data), self.generator) \
            if cfg.privacy.enabled else None
        if self.private:
            self.model, self.optimizer = self.private.model, self.private.optimizer
        self.loss = task.loss(cfg, torch.tensor(data.weights, dtype=torch.float32, device=device))
        self.average = WeightAverage(self.network, cfg.ema) if cfg.ema else None
        self.evaluated = self.average.model if self.average else self.network
        self.history: list[dict[str, Any]] = []
        self.best_score, self.best_epoch, self.best_state = -math.inf, 0, None

    @property
    def done(self) -> bool:
        """All epochs run, or ``train.patience`` epochs without a better validation score."""
        epoch = len(self.history)
        return epoch >= self.cfg.epochs or bool(self.history) and epoch - self.best_epoch >= self.cfg.patience

    def epoch(self, val: dict[str, Any]) -> None:
        """Train one epoch, validate, and keep the weights when the task's validation metric improved
        (the loss decides when the metric is undefined)."""
        number = len(self.history) + 1
        tr = train_epoch(self.model, self.data, self.task, self.loss, self.optimizer, self.cfg, self.generator,
                         self.device, number, self.average, self.world, self.private)
        va = evaluate_split(self.evaluated, self.task, val["images"], val["labels"], self.data.weights, self.device)
        self.history.append({"epoch": number, **{f"train_{k}": v for k, v in tr.items()},
                             **{f"val_{k}": v for k, v in va.items()}})
        score = va[self.task.selection] if va[self.task.selection] is not None else -va["loss"]
        improved = score > self.best_score
        if improved:
            self.best_score, self.best_epoch = score, number
            self.best_state = copy.deepcopy(self.evaluated.state_dict())
        log.info("epoch %d/%d  train loss %.4f auc %s | val loss %.4f acc %.4f %s %s%s", number, self.cfg.epochs,
                 tr["loss"], _fmt(tr["roc_auc"]), va["loss"], va["accuracy"], self.task.selection,
                 _fmt(va[self.task.selection]), "  *best" if improved else "")

    def state_dict(self, key: str) -> dict[str, Any]:
        """Everything a resumed run needs, tagged with the run's fingerprint ``key``."""
        return {"fingerprint": key, "model": self.network.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "history": json.dumps(self.history),
                "best_auc": self.best_score, "best_epoch": self.best_epoch, "best_model": self.best_state,
                **({"average": self.average.state_dict()} if self.average else {}),
                **({"privacy": self.private.state_dict()} if self.private else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        if self.average:
            self.average.load_state_dict(state["average"])
        if self.private:
            self.private.load_state_dict(state["privacy"])
        self.history, self.best_score = json.loads(state["history"]), state["best_auc"]
        self.best_epoch, self.best_state = state["best_epoch"], state["best_model"]

    def finish(self) -> tuple[Classifier, dict[str, Any] | None]:
        """The best epoch's network on the CPU, and the DP-SGD guarantee spent (None without privacy)."""
        if len(self.history) < self.cfg.epochs:
            log.info("early stopping: no validation %s gain for %d epochs", self.task.selection, self.cfg.patience)
        guarantee = None
        if self.private:
            guarantee = self.private.guarantee()
            self.private.release()
            log.info("DP-SGD spent ε = %.3f at δ = %.2e over %d steps", guarantee["epsilon"], guarantee["delta"],
                     guarantee["steps"])
        self.network.load_state_dict(self.best_state)
        return self.network.to("cpu", memory_format=torch.contiguous_format), guarantee


def fit(params: Params, task: Task, data: TrainingSet, val: dict[str, Any], meta: dict[str, Any], key: str,
        device: torch.device, checkpoint: Path | None = None, world: World = distributed.ALONE,
        on_epoch: Callable[[int, float | None], None] | None = None
        ) -> tuple[Classifier, list[dict[str, Any]], int, dict[str, Any] | None, dict[str, Any] | None]:
    """Train on ``device`` with early stopping on the task's validation metric (ROC AUC, or kappa
    for grades); returns the best model, history, best epoch and, with ``train.privacy.enabled``,
    the DP-SGD guarantee spent (None otherwise).

    After every epoch the whole training state is saved to ``checkpoint`` (by the first worker);
    a run interrupted (Ctrl-C, kill) and started again with the same params and data (``key``)
    resumes there and ends with the same bytes as an uninterrupted run. ``on_epoch(epoch,
    validation metric)`` is called after every epoch (a search's pruner: it may raise to stop).
    """
    training = Training(params, task, data, meta, device, world)
    state = load_progress(checkpoint, key) if checkpoint else None
    if state:
        training.load_state_dict(state)
        log.info("resuming from the checkpoint of epoch %d (%s)", len(training.history), checkpoint)
    while not training.done:
        training.epoch(val)
        if checkpoint and world.is_main:
            save_progress(checkpoint, training.state_dict(key))
        if on_epoch:
            on_epoch(len(training.history), training.history[-1][f"val_{task.selection}"])
    network, guarantee = training.finish()
    return network, training.history, training.best_epoch, guarantee, training.pretrained


def run(params: Params, prepared: Path = paths.PREPARED, balanced: Path = paths.BALANCED,
        model_path: Path = paths.NETWORK, out_dir: Path = paths.TRAIN_DIR,
        checkpoint: Path | None = paths.CHECKPOINT, world: World = distributed.ALONE,
        on_epoch: Callable[[int, float | None], None] | None = None) -> dict[str, Any]:
    meta = load_meta(prepared)
    task = tasks.for_data(meta.get("task"), meta["class_names"])
    data = load_training_set(prepared, balanced)
    val = load_split(prepared, "val")
    log.info("training %s for a %s task on %d images (%s), validating on %d%s", params.train.model, task.name,
             len(data), counts(data.labels, meta["class_names"]), len(val["labels"]),
             f", worker {world.rank + 1} of {world.size}" if world.size > 1 else "")
    device = world.device or select_device(params.train.device)  # torchrun's worker has its own GPU
    start = time.perf_counter()
    model, history, best_epoch, guarantee, weights = fit(
        params, task, data, val, meta, fingerprint(params, prepared, balanced), device, checkpoint, world, on_epoch)
    seconds = time.perf_counter() - start
    best = history[best_epoch - 1]
    metrics = {"train": {
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "parameters": count_parameters(model),
        "val_roc_auc": rounded(best["val_roc_auc"]),
        "val_accuracy": rounded(best["val_accuracy"]),
        "val_loss": rounded(best["val_loss"]),
        **{f"val_{m}": rounded(best[f"val_{m}"]) for m in task.epoch_metrics if m not in ("accuracy", "roc_auc")},
        **learning_checks(history, best_epoch, task.chance_loss(effective(params.train, task))),
    }}
    if guarantee is not None:
        metrics["train"]["privacy"] = guarantee
    if weights is not None:
        metrics["train"]["pretrained"] = weights
    if not world.is_main:
        return metrics
    # A checkpoint names its task unless it has one class per image (as every checkpoint made
    # before the other tasks existed): the single-label checkpoint keeps its bytes.
    save_checkpoint(model_path, model, {"class_names": meta["class_names"], "best_epoch": best_epoch,
                                        **({"task": task.name} if task.family != "single" else {}),
                                        **({"privacy": guarantee} if guarantee else {}),
                                        **({"pretrained": weights} if weights else {})})
    columns = history_columns(task)
    write_csv(out_dir / paths.HISTORY, columns, [[rounded(row[c]) for c in columns] for row in history])
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
    log.info("best epoch %d, val %s %s, %d parameters, %.1f s", best_epoch, task.selection,
             _fmt(best[f"val_{task.selection}"]),
             metrics["train"]["parameters"], seconds)
    return metrics


def assemble(params: Params, prepared: Path = paths.PREPARED, models: Path = paths.FOLD_MODELS,
             reports: Path = paths.FOLD_REPORTS, model_path: Path = paths.NETWORK,
             out_dir: Path = paths.TRAIN_DIR) -> dict[str, Any]:
    """``cv.folds``: the fold models (``fold@<n>`` stages) as one :class:`Ensemble`, each member
    behind the temperature fitted on its own held-out fold; nothing is trained here.

    ``metrics.json`` holds the ensemble's parameters and each fold's training record under
    ``per_fold.<n>`` (``best_epoch``, ``epochs_run``, held-out ``val_roc_auc``); ``history.csv``
    every fold's epochs with a ``fold`` column; ``timing.json`` the folds' training seconds summed."""
    meta = load_meta(prepared)
    task = tasks.for_data(meta.get("task"), meta["class_names"])
    found, members, histories, timings = [], [], [], []
    for fold in params.cv.folds:
        folder = reports / str(fold)
        if not (folder / paths.METRICS).is_file():
            raise PipelineError(f"{folder / paths.METRICS}: not found (run the fold@{fold} stage first: dvc repro)")
        found.append(read_json(folder / paths.METRICS))
        members.append(load_checkpoint(models / str(fold) / paths.NETWORK.name)[0])
        histories += [{"fold": fold, **row} for row in read_csv(folder / paths.HISTORY)]
        timings.append(read_json(folder / paths.TIMING))
    ensemble = Ensemble(members, [record["fold"]["temperature"] for record in found])
    trained = [record["train"] for record in found]
    improved = [t["improved_after_first_epoch"] for t in trained]
    metrics = {"train": {
        "folds": params.cv.k,
        "parameters": count_parameters(ensemble),
        "per_fold": {str(fold): {key: t[key] for key in ("best_epoch", "epochs_run", "val_roc_auc", "min_train_loss",
                                                         "left_chance", "improved_after_first_epoch")}
                     for fold, t in zip(params.cv.folds, trained)},
        "chance_loss": trained[0]["chance_loss"],
        "left_chance": all(t["left_chance"] for t in trained),
        "improved_after_first_epoch": None if None in improved else all(improved),
        **({"pretrained": trained[0]["pretrained"]} if "pretrained" in trained[0] else {}),  # every fold's start
    }}
    save_checkpoint(model_path, ensemble, {"class_names": meta["class_names"],  # one class per image: no task entry
                                           "best_epoch": [t["best_epoch"] for t in trained],
                                           **({"pretrained": trained[0]["pretrained"]} if "pretrained" in trained[0]
                                              else {})})
    columns = ("fold", *history_columns(task))
    write_csv(out_dir / paths.HISTORY, columns, [[row[c] for c in columns] for row in histories])
    write_json(out_dir / paths.METRICS, metrics)
    seconds = sum(t["seconds"] for t in timings)
    images = sum(t["images_per_second"] * t["seconds"] for t in timings)  # images trained on, over all folds
    write_json(out_dir / paths.TIMING, {**timings[0], "seconds": rounded(seconds, SECONDS_DECIMALS),
                                        "images_per_second": rounded(images / seconds, SECONDS_DECIMALS)})
    plot_history([{k: (float(v) if v not in ("", "None") else None) for k, v in row.items()} for row in histories],
                 out_dir / paths.CURVES)
    log.info("ensemble of %d fold models, %d parameters; held-out ROC AUC per fold %s", params.cv.k,
             metrics["train"]["parameters"], ", ".join(_fmt(t["val_roc_auc"]) for t in trained))
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
        if params.cv.k:
            seed_everything(params.seed)
            assemble(params)
            return 0
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
