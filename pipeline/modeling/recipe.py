"""The training recipe: optimiser, loss, sampling order, learning-rate schedule, augmentation, weight average.

One registry per choice in params (``OPTIMIZERS``, ``LOSSES``, ``SAMPLERS``, ``SCHEDULES``),
kept apart from the train stage so each piece can be tested on its own. Everything random
takes an explicit ``torch.Generator``, so the same seed gives the same batches and model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn

from pipeline.core.config import TrainParams

# AdamW runs fused: one ATen kernel per parameter, whose square root is the CPU's exact
# instruction. The unfused step calls torch.sqrt, which ATen hands to MKL's vector math (VML),
# whose results differ between Intel and AMD CPUs whatever MKL_CBWR says (pipeline.core.kernels).
OPTIMIZERS: dict[str, Callable[[nn.Module, TrainParams], torch.optim.Optimizer]] = {
    "sgd": lambda model, cfg: torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                              weight_decay=cfg.weight_decay),
    "adamw": lambda model, cfg: torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                  fused=True),
}


def make_optimizer(model: nn.Module, cfg: TrainParams) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.optimizer](model, cfg)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_true)^gamma, class-weighted.

    gamma = 0 is (weighted, label-smoothed) cross-entropy; larger gamma down-weights easy
    examples, which helps when one class dominates. Per image, weighted, as the other losses.
    """

    def __init__(self, gamma: float, weight: torch.Tensor, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.gamma, self.label_smoothing = gamma, label_smoothing
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = nn.functional.cross_entropy(logits, target, reduction="none", label_smoothing=self.label_smoothing)
        p_true = torch.softmax(logits, dim=1).gather(1, target[:, None])[:, 0]
        return (1 - p_true).pow(self.gamma) * ce * self.weight[target]


class CornLoss(nn.Module):
    """CORN's loss per image: binary cross-entropy of each conditional output k on the images it
    applies to (grade >= k), target grade > k, summed over the outputs that apply and divided by
    K-1; weighted by the image's grade weight."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(logits.shape[1], device=logits.device)
        applies = (target[:, None] >= steps).to(logits.dtype)
        above = (target[:, None] > steps).to(logits.dtype)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, above, reduction="none")
        return (loss * applies).sum(dim=1) / logits.shape[1] * self.weight[target]


# Each gives the class-weighted loss of every image (reduction "none"): the training step divides
# their sum by the batch's total weight, which is a weighted mean in one process and stays
# exactly that when a batch is shared out over several (see pipeline.train).
LOSSES: dict[str, Callable[[TrainParams, torch.Tensor], nn.Module]] = {
    "cross_entropy": lambda cfg, weight: nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing,
                                                             reduction="none"),
    "focal": lambda cfg, weight: FocalLoss(cfg.focal_gamma, weight, cfg.label_smoothing),
    "corn": lambda cfg, weight: CornLoss(weight),  # ordinal grades: K-1 outputs (pipeline.tasks.ordinal)
}


def make_loss(cfg: TrainParams, weight: torch.Tensor) -> nn.Module:
    return LOSSES[cfg.loss](cfg, weight)


def _class_balanced_draw(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``torch.utils.data.WeightedRandomSampler`` with weights 1/n_class: every class is drawn
    equally often in expectation, with replacement, and the epoch keeps its length.

    Multi-label data (N×L, label-aware): an image weighs the mean of 1/n over the findings it
    has (n: images with that finding), and images with none 1/(images with none), so rare
    findings are drawn about as often as common ones and normal images as often as each."""
    if labels.ndim == 2:
        present = (labels == 1).double()
        rarity = 1.0 / present.sum(dim=0).clamp(min=1)
        normal = present.sum(dim=1) == 0
        weights = torch.where(normal, 1.0 / normal.sum().clamp(min=1),
                              (present * rarity).sum(dim=1) / present.sum(dim=1).clamp(min=1))
    else:
        counts = torch.bincount(labels).double()
        weights = (1.0 / counts)[labels]
    draw = torch.utils.data.WeightedRandomSampler(weights, len(labels), replacement=True, generator=generator)
    return torch.tensor(list(draw))


SAMPLERS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "none": lambda labels, generator: torch.randperm(len(labels), generator=generator),
    "weighted": _class_balanced_draw,
}


def epoch_order(labels: torch.Tensor, sampler: str, generator: torch.Generator) -> torch.Tensor:
    """Indices for one epoch: a seeded permutation, or (``weighted``) a class-balanced draw."""
    return SAMPLERS[sampler](labels, generator)


# Learning-rate multiplier as a function of progress through the post-warm-up steps (0 → 1).
SCHEDULES: dict[str, Callable[[float], float]] = {
    "none": lambda progress: 1.0,
    "cosine": lambda progress: 0.5 * (1 + math.cos(math.pi * progress)),
    # one-cycle's annealing half (the warm-up is its rising half): cosine down to lr / 100
    "onecycle": lambda progress: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)),
}


def lr_factor(cfg: TrainParams, step: int, total: int) -> float:
    """Multiplier of ``train.lr`` at optimiser step ``step`` of ``total``: linear warm-up, then the schedule."""
    warmup = cfg.warmup_epochs * total / max(cfg.epochs, 1)
    if warmup and step < warmup:
        return (step + 1) / warmup
    return SCHEDULES[cfg.schedule](min(1.0, (step - warmup) / max(total - warmup, 1)))


def precision(cfg: TrainParams, device: torch.device) -> str:
    """What the training step computes in: bfloat16 autocast on a GPU when ``train.precision``
    asks for it, float32 otherwise (the CPU path, deterministic, whatever the param says)."""
    return cfg.precision if device.type == "cuda" else "float32"


def layout(cfg: TrainParams, ndim: int) -> torch.memory_format:
    """The memory layout training keeps 2-D weights and activations in: channels-last (NHWC)
    with ``train.channels_last``, else PyTorch's default NCHW.

    oneDNN runs its CPU convolutions in channel blocks of 8 or 16: an NCHW activation with
    fewer channels is padded to a block and converted on every convolution, forward and
    backward, in buffers several times the activation's size. Channels-last tensors go in as
    they are. At 128 px that is faster and holds less memory (``bench/layout.py``,
    ``bench/memory.py``); at 64 px and below the channels-last kernels are slower. The saved
    model is NCHW either way. Volumes (``ndim`` 3) keep the default: their convolutions
    already train channels-last on the CPU, each on its own (:class:`networks.Conv3d`).
    """
    return torch.channels_last if cfg.channels_last and ndim == 2 else torch.contiguous_format


def augment(x: torch.Tensor, cfg: TrainParams, generator: torch.Generator, rows: slice | None = None,
            drawn: int | None = None) -> torch.Tensor:
    """Seeded random affine (rotation, translation, scale), optional flips, brightness/contrast jitter.

    Off when every strength is 0. Flips are off by default: chest images have laterality; when
    on, they mirror left-right only (the last axis), in volumes too: head-foot and front-back
    mirrors make no anatomy. A volume is moved in-plane, every axial slice by the same
    rotation (about the head-foot axis), zoom and shift: the ways a patient's position on the
    table and the field of view vary between CT and MR scans, while the slice spacing is the
    protocol's. This runs the vectorised 2-D sampler on the slices, about six times faster on
    this CPU than a 3-D ``grid_sample`` of the same voxels.
    The random draws are made for ``drawn`` images (default: ``len(x)``) and ``x`` takes the
    ``rows`` of them: a data-parallel worker augments its share of a batch exactly as one
    process augments the whole batch, and every worker's generator stays in step. The draws
    come from the CPU ``generator``; the sampling runs where ``x`` is (on a GPU, there).
    """
    n, rows = drawn or len(x), rows or slice(None)
    spatial = tuple(range(1, x.ndim))
    if cfg.aug_rotate or cfg.aug_translate or cfg.aug_scale:
        def uniform(limit: float) -> torch.Tensor:
            return (torch.rand(n, generator=generator) * 2 - 1) * limit

        theta = _affine_2d(uniform, cfg)[rows].to(x.device)
        volume = x.shape if x.ndim == 5 else None
        if volume is not None:  # N×C×D×H×W → (N·D)×C×H×W slices, each moved as its volume
            n_, c, d, h, w = volume
            x, theta = x.transpose(1, 2).reshape(n_ * d, c, h, w), theta.repeat_interleave(d, dim=0)
        grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        x = nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if volume is not None:
            x = x.reshape(n_, d, c, h, w).transpose(1, 2)
    if cfg.aug_flip:
        flip = (torch.rand(n, generator=generator) < 0.5)[rows].to(x.device)
        x = torch.where(flip.view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)
    if cfg.aug_intensity:
        shape = (n, *[1] * (x.ndim - 1))
        gain = (1 + (torch.rand(shape, generator=generator) * 2 - 1) * cfg.aug_intensity)[rows].to(x.device)
        shift = ((torch.rand(shape, generator=generator) * 2 - 1) * cfg.aug_intensity / 2)[rows].to(x.device)
        mean = x.mean(dim=spatial, keepdim=True)
        x = ((x - mean) * gain + mean + shift).clamp(0, 1)
    return x


def _affine_2d(uniform: Callable[[float], torch.Tensor], cfg: TrainParams) -> torch.Tensor:
    """N×2×3 matrices for ``affine_grid``: rotation, isotropic zoom, shift (in grid units).

    Cosine and sine come from Python's ``math`` (libm, in float64): ``torch.cos`` runs in MKL's
    vector math, whose last bits differ between CPU vendors (see :mod:`pipeline.core.kernels`).
    """
    angle = uniform(cfg.aug_rotate) * math.pi / 180
    scale = 1 + uniform(cfg.aug_scale)
    tx, ty = uniform(cfg.aug_translate) * 2, uniform(cfg.aug_translate) * 2  # grid units span [-1, 1]
    turns = angle.tolist()
    cos = torch.tensor([math.cos(a) for a in turns], dtype=torch.float32) / scale
    sin = torch.tensor([math.sin(a) for a in turns], dtype=torch.float32) / scale
    return torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)


class WeightAverage:
    """Exponential moving average of a model's weights and batch-norm statistics (Polyak averaging).

    After every optimiser step ``avg = d * avg + (1 - d) * current``, with the decay warmed up
    as ``d = min(decay, (1 + n) / (10 + n))`` after n updates so the first steps are not
    dominated by the initial weights. On short runs the warm-up, not ``decay``, sets the
    horizon: BreastMNIST's 15 epochs are 135 steps, after which d is 0.94 whatever the decay.
    The average is a flatter, less noisy point than the last step, which pays most on small,
    noisy datasets (BreastMNIST's 546 training images).
    Deterministic: plain tensor arithmetic in a fixed order.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay, self.updates = decay, 0
        self.source = model  # the network being trained, whose weights are averaged
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        current = model.state_dict()
        for name, avg in self.model.state_dict().items():
            if avg.is_floating_point():
                avg.mul_(d).add_(current[name].detach(), alpha=1 - d)
            else:
                avg.copy_(current[name])  # e.g. batch norm's num_batches_tracked

    def state_dict(self) -> dict[str, object]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
