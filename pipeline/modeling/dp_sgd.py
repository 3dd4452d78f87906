"""Differentially private training (DP-SGD) with Opacus: ``train.privacy.enabled: true``.

DP-SGD (Abadi et al. 2016) bounds what the trained weights can reveal about any one training
image: each step draws a Poisson sample of the training set (every image independently, with
probability q = batch_size / n), clips every image's gradient to L2 norm C
(``max_grad_norm``), adds Gaussian noise of standard deviation σ·C to their sum, and steps.
Opacus' ``PrivacyEngine.make_private_with_epsilon`` picks σ so that ``train.epochs`` epochs of
such steps spend at most ``target_epsilon`` for δ (``delta``, default 1/(10·n)); its accountant
(PRV by default, also RDP or GDP) then measures the ε actually spent.

What stays valid and what does not, checked before training (:func:`refusals`):

- kept: per-image losses (cross-entropy or focal, with the balance stage's class weights,
  which scale an image's gradient before it is clipped), per-image augmentation, learning-rate
  schedules, early stopping on validation (the validation split is not protected), and the
  exponential weight average: DP-SGD's guarantee covers every intermediate model, so any
  function of them, their average included, is post-processing (De et al. 2022 use it).
- refused: oversampling, undersampling and SMOTE (an image repeated or blended into others
  enters the sum more than once: its influence is no longer bounded by C), the class-balanced sampler
  (the accounting assumes Poisson sampling), a global gradient clip on top of the per-image one,
  BatchNorm (mixes images within a batch; use ``train.norm: group``), and several processes.

Reproducibility: the Poisson draws come from the run's seeded generator through Opacus' own
``UniformWithReplacementSampler``, and the noise from a second seeded generator, so the same
params and seed give the same bytes. ``secure_mode: true`` hands both to Opacus' secure random
generator (``torchcsprng``, installed separately): the guarantee then also holds against an
attacker who knows the seed, and no two runs are alike.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.core.config import Params
from pipeline.core.errors import PipelineError
from pipeline.modeling import networks

log = logging.getLogger(__name__)

# Seeds the noise generator apart from the one that draws batches and augmentation.
NOISE_STREAM = 0x5EED_D9


def refusals(params: Params) -> list[str]:
    """The settings that would void the DP-SGD guarantee, each with the reason."""
    cfg = params.train
    found = []
    if params.balance.strategy not in ("none", "class_weight"):
        found.append(f"balance.strategy={params.balance.strategy} (repeated or blended training images: one "
                     "image's influence is no longer bounded by the clipping norm; use none or class_weight)")
    if cfg.sampler != "none":
        found.append(f"train.sampler={cfg.sampler} (the accounting assumes Poisson sampling)")
    if cfg.grad_clip not in (0, "auto"):  # auto is off under DP-SGD
        found.append("train.grad_clip>0 (per-image clipping is train.privacy.max_grad_norm)")
    if cfg.model != "seed_cnn" and cfg.norm != "group":
        found.append(f"train.norm={cfg.norm} (batch statistics mix images; use train.norm=group)")
    if cfg.processes != 1:
        found.append(f"train.processes={cfg.processes} (private training runs in one process)")
    if cfg.channels_last:
        # Measured with Opacus 1.6: conv weights' per-image gradients off by as much as their size.
        found.append("train.channels_last=true (Opacus computes per-image convolution gradients for NCHW "
                     "tensors only; channels-last ones come out wrong)")
    return found


def check(params: Params) -> None:
    """Refuse, before any work, the params that would void the guarantee."""
    if params.train.privacy.enabled and (found := refusals(params)):
        raise PipelineError("train.privacy.enabled=true cannot be combined with: " + "; ".join(found))


def delta_for(params: Params, n_train: int) -> float:
    """δ: the param, or 1/(10·n) when null (well below 1/n: a mechanism that published one
    training image at random would satisfy any ε at δ = 1/n)."""
    delta = params.train.privacy.delta
    return delta if delta is not None else 1.0 / (10 * n_train)


@dataclasses.dataclass
class PrivateTraining:
    """The Opacus-wrapped model and optimiser, the accountant, and the batch sampler."""

    engine: Any
    model: nn.Module
    optimizer: Any
    sampler: Any
    delta: float

    def batches(self) -> Iterator[np.ndarray]:
        """One epoch of Poisson-sampled batches (training-set positions; some may be empty)."""
        for indices in self.sampler:
            yield np.asarray(indices, dtype=np.int64)

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": [list(step) for step in self.engine.accountant.history],
                "noise": self.optimizer.generator.get_state() if self.optimizer.generator is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.accountant.history = [tuple(step) for step in state["accountant"]]
        if state["noise"] is not None:
            self.optimizer.generator.set_state(state["noise"])

    def guarantee(self) -> dict[str, Any]:
        """What the run spent, for metrics.json, the report, MLflow and the model package."""
        engine = self.engine
        steps = sum(int(step[2]) for step in engine.accountant.history)
        # ε and σ come out of numerical searches: rounded, so metrics stay byte-stable.
        return {"epsilon": round(float(engine.accountant.get_epsilon(self.delta)), 6) if steps else 0.0,
                "delta": self.delta,
                "accountant": engine.accountant.mechanism(),
                "max_grad_norm": float(self.optimizer.max_grad_norm),
                "noise_multiplier": round(float(self.optimizer.noise_multiplier), 6),
                "sample_rate": float(self.sampler.sample_rate),
                "steps": steps,
                "secure_mode": bool(engine.secure_mode)}

    def release(self) -> None:
        """Remove Opacus' hooks from the network (it is saved and used as a plain module)."""
        self.model._close()


def make_private(params: Params, network: nn.Module, optimizer: torch.optim.Optimizer, n_train: int,
                 generator: torch.Generator) -> PrivateTraining:
    """Wrap ``network`` and ``optimizer`` for DP-SGD over ``n_train`` images for ``train.epochs`` epochs."""
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    cfg, privacy = params.train, params.train.privacy
    for module in network.modules():
        if type(module) is networks.Conv3d:  # Opacus matches layer types exactly; its per-sample
            module.__class__ = nn.Conv3d     # gradients need no layout trick (same parameters)
    problems = ModuleValidator.validate(network, strict=False)
    if problems:
        found = sorted({f"{type(p).__name__}: {str(p).split('. ')[0]}" for p in problems})  # one line per kind
        raise PipelineError(f"train.privacy: train.model={cfg.model} is not DP-compatible: " + "; ".join(found))
    # The engine derives the sampling rate (1 / number of batches) and the dataset size from a
    # loader; its Poisson loader is then driven by the run's own generator (below).
    positions = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(n_train)),
                                            batch_size=min(cfg.batch_size, n_train))
    noise = None if privacy.secure_mode else torch.Generator().manual_seed(params.seed ^ NOISE_STREAM)
    delta = delta_for(params, n_train)
    # Opacus' per-image gradients come from backward hooks; torch notes that the input needs no gradient.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    # The accountants' search over Rényi orders notes where it hit its range; ε is still an upper bound.
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")  # reported in the guarantee instead
        try:
            engine = PrivacyEngine(accountant=privacy.accountant, secure_mode=privacy.secure_mode)
        except ImportError as exc:
            raise PipelineError(f"train.privacy.secure_mode=true needs the torchcsprng package ({exc})") from None
        model, dp_optimizer, loader = engine.make_private_with_epsilon(
            module=network, optimizer=optimizer, data_loader=positions, target_epsilon=privacy.target_epsilon,
            target_delta=delta, epochs=cfg.epochs, max_grad_norm=privacy.max_grad_norm, poisson_sampling=True,
            noise_generator=noise, loss_reduction="mean")
    sampler = loader.batch_sampler
    if not privacy.secure_mode:
        sampler.generator = generator
    log.info("DP-SGD: noise multiplier %.3f, sampling rate %.4f, clipping %.2f, target ε %.2f at δ %.2e (%s)",
             dp_optimizer.noise_multiplier, sampler.sample_rate, privacy.max_grad_norm, privacy.target_epsilon, delta,
             privacy.accountant)
    return PrivateTraining(engine, model, dp_optimizer, sampler, delta)
