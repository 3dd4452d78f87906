"""Training speed: the project's train loop vs a bare PyTorch loop, and this CPU's matmul ceiling.

Every loop trains the same network (default params) on the same data with the same batch
size, side by side in one process, alternating, so machine noise hits them alike:

- ``bare``: the seed's loop (shuffle, forward, loss, backward, step) on images in memory;
- ``project``: the project's ``train_epoch`` doing the same work (augmentation and weight
  averaging off): batches streamed from the ``.npy`` file on disk, seeded ordering, per-step
  learning rates, loss/accuracy/AUC bookkeeping, progress. It must reach at least 0.9× the bare
  loop's images per second;
- ``project, default params``: the same with the default augmentation and weight averaging,
  to show what those features cost on top.

The achieved fraction of the CPU's measured float32 matmul throughput puts the absolute
number in context.

    python bench/train_speed.py [epochs]
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from common import provenance

from pipeline.core.config import load_params
from pipeline.core.dataset import ImageRows, TrainingSet
from pipeline.core.runtime import configure_torch
from pipeline.data.phantom import generate_split
from pipeline.modeling.networks import ModelConfig, build_model
from pipeline.modeling.recipe import WeightAverage, make_loss, make_optimizer
from pipeline.tasks import for_data
from pipeline.train import train_epoch

BINARY = for_data("binary", ["normal", "lesion"])

REPO = Path(__file__).resolve().parents[1]


def bare_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer, loss_fn, batch: int,
               generator: torch.Generator) -> None:
    """The seed's loop: shuffle, forward, loss, backward, step."""
    model.train()
    order = torch.randperm(len(y), generator=generator)
    for start in range(0, len(y), batch):
        idx = order[start:start + batch]
        loss = loss_fn(model(x[idx].float().div_(255.0)), y[idx]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def training_flops_per_image(model: nn.Module, shape: tuple[int, ...]) -> float:
    """2·MACs of every conv/linear in one forward pass, ×3 for forward + backward."""
    macs = []

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            macs.append(output.numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1] / module.groups)
        elif isinstance(module, nn.Linear):
            macs.append(module.in_features * module.out_features)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.rand(1, *shape))
    for h in handles:
        h.remove()
    return 3 * 2 * sum(macs)


def matmul_gflops(n: int = 1024, repeat: int = 20) -> float:
    a, b = torch.rand(n, n), torch.rand(n, n)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeat):
        torch.mm(a, b)
    return 2 * n**3 * repeat / (time.perf_counter() - start) / 1e9


def main() -> None:
    print(provenance())
    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    params = load_params(REPO / "params.yaml")
    cfg = params.train
    configure_torch(cfg.threads)
    data = generate_split(params.data.phantom, params.seed, "train")
    x = torch.from_numpy(np.ascontiguousarray(data["images"].transpose(0, 3, 1, 2)))
    y = torch.from_numpy(data["labels"])
    folder = Path(tempfile.mkdtemp(prefix="medcnn-train-speed-"))
    np.save(folder / "images.npy", data["images"])
    stream = TrainingSet(ImageRows(folder / "images.npy"), np.arange(len(y)), data["images"][:0], data["labels"],
                         [1.0, 1.0])
    config = ModelConfig(cfg.model, 1, 2, x.shape[2], cfg.width, 0.3, 0.2)
    same_work = dataclasses.replace(cfg, aug_rotate=0.0, aug_translate=0.0, aug_scale=0.0, aug_intensity=0.0,
                                    aug_flip=False, ema=0.0)
    loops = {"bare": None, "project": same_work, "project, default params": cfg}
    rates: dict[str, list[float]] = {name: [] for name in loops}
    models = {}
    for name in loops:
        torch.manual_seed(0)
        model = build_model(config)
        average = WeightAverage(model, loops[name].ema) if loops[name] and loops[name].ema else None
        models[name] = (model, make_optimizer(model, cfg), make_loss(cfg, torch.ones(2)), torch.Generator().manual_seed(0),
                        average)
    for epoch in range(1, epochs + 2):  # the first round warms up and is not counted
        for name, (model, optimizer, loss_fn, generator, average) in models.items():
            loop_cfg = loops[name]
            start = time.perf_counter()
            if loop_cfg is None:
                bare_epoch(model, x, y, optimizer, loss_fn, cfg.batch_size, generator)
            else:
                train_epoch(model, stream, BINARY, loss_fn, optimizer, loop_cfg, generator, torch.device("cpu"), epoch, average)
            if epoch > 1:
                rates[name].append(len(y) / (time.perf_counter() - start))
    median = {name: float(np.median(r)) for name, r in rates.items()}
    project, bare = median["project"], median["bare"]
    flops = training_flops_per_image(models["bare"][0], tuple(x.shape[1:]))
    peak = matmul_gflops()
    print(f"model {cfg.model} (width {cfg.width}), {x.shape[2]}×{x.shape[3]} images, batch {cfg.batch_size}, "
          f"{cfg.threads} threads, {epochs} timed epochs of {len(y)} images")
    print(f"{'loop':<26}{'images/s':>10}{'/ bare':>8}")
    for name, rate in median.items():
        print(f"{name:<26}{rate:>10.0f}{rate / bare:>8.3f}")
    print(f"project / bare, same work: {project / bare:.3f}  (target >= 0.9)")
    shutil.rmtree(folder)
    print(f"training FLOPs per image: {flops / 1e6:.1f} M; float32 matmul peak here: {peak:.1f} GFLOP/s; "
          f"achieved by the project loop: {project * flops / 1e9:.2f} GFLOP/s = {project * flops / 1e9 / peak:.1%} of it")


if __name__ == "__main__":
    main()
