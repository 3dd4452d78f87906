"""How far an explanation deserves trust, measured (not assumed).

- **Faithfulness**: deletion and insertion curves (Petsiuk et al. 2018): pixels are removed
  from the image (replaced by a blurred copy), or inserted into the blurred copy, in the map's order, and the
  target's probability is read at each step; the area under each curve is compared with a
  random order. A faithful map has a lower deletion and a higher insertion area than random.
  Captum's ``infidelity`` and ``sensitivity_max`` (Yeh et al. 2019) complete the picture.
- **Sanity check**: model-parameter randomisation (Adebayo et al. 2018), cascading from the
  top layer: maps of a method that explains the model must change when its weights do. The
  Spearman rank correlation and SSIM between original and randomised maps are reported; a
  method whose Spearman correlation after full randomisation exceeds the threshold fails.
- **Localisation** (where ground-truth masks exist): pointing game, fraction of the positive
  attribution mass inside the mask, and AUPRC of the map against the mask, each with a
  bootstrap interval and its chance level.
- **Shortcut**: fraction of the attribution's magnitude on a known confounder's box.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.ndimage import binary_dilation, uniform_filter
from scipy.stats import spearmanr
from torch import nn

from pipeline.core.files import DECIMALS, rounded
from pipeline.evaluation.metrics import average_precision
from pipeline.xai.attributions import copies_per_pass, footprint


def _probabilities(model: nn.Module, batch: torch.Tensor, target: int) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(model(batch), dim=1)[:, target].numpy()


def blurred(image: torch.Tensor) -> torch.Tensor:
    """The baseline pixels are removed to: a heavily blurred copy (σ = side / 8).

    Black holes would be out of distribution and measure the model's reaction to artefacts;
    blur removes the local evidence while keeping the image plausible (Petsiuk et al. 2018).
    """
    from scipy.ndimage import gaussian_filter

    sigma = image.shape[1] / 8
    return torch.from_numpy(np.stack([gaussian_filter(c, sigma, mode="nearest") for c in image.numpy()])).float()


def perturbation_curves(model: nn.Module, image: torch.Tensor, target: int, order: np.ndarray,
                        steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion curves (steps + 1 probabilities each) for one image (or volume) and pixel order."""
    spatial = image.shape[1:]
    pixels = math.prod(spatial)
    base = blurred(image)
    counts = np.rint(np.linspace(0, pixels, steps + 1)).astype(int)
    keep = np.zeros((steps + 1, pixels), dtype=bool)
    for k, n in enumerate(counts):
        keep[k, order[:n]] = True  # pixels removed (deletion) / inserted (insertion) by step k
    keep_t = torch.from_numpy(keep.reshape(steps + 1, 1, *spatial))
    deleted = torch.where(keep_t, base[None], image[None])
    inserted = torch.where(keep_t, image[None], base[None])
    return _probabilities(model, deleted, target), _probabilities(model, inserted, target)


def area(curve: np.ndarray) -> float:
    """Area under a curve sampled at equal steps over [0, 1]."""
    return float(np.trapezoid(curve, dx=1.0 / (len(curve) - 1)))


def faithfulness(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, maps: dict[str, np.ndarray],
                 steps: int, seed: int) -> dict[str, dict]:
    """Per method (and 'random'): mean deletion/insertion areas and the mean curves."""
    rng = np.random.default_rng([seed, 6])
    orders = {name: [np.argsort(-m.ravel(), kind="stable") for m in method_maps] for name, method_maps in maps.items()}
    orders["random"] = [rng.permutation(math.prod(inputs.shape[2:])) for _ in range(len(inputs))]
    out = {}
    for name, per_image in orders.items():
        curves = [perturbation_curves(model, inputs[i], int(targets[i]), order, steps) for i, order in enumerate(per_image)]
        deletion = np.mean([c[0] for c in curves], axis=0)
        insertion = np.mean([c[1] for c in curves], axis=0)
        out[name] = {"deletion_auc": rounded(float(np.mean([area(c[0]) for c in curves]))),
                     "insertion_auc": rounded(float(np.mean([area(c[1]) for c in curves]))),
                     "deletion_curve": deletion.round(DECIMALS).tolist(), "insertion_curve": insertion.round(DECIMALS).tolist()}
    return out


class _Copies:
    """The random perturbations of ``n_perturb`` copies of ``n`` inputs, drawn at once (as one
    pass of all copies would draw them) and handed out in Captum's order, the next few copies of
    every input per call: a check's value does not depend on how its copies are batched."""

    def __init__(self, n: int, n_perturb: int, draw: Callable[[tuple[int, ...], torch.Generator], torch.Tensor],
                 seed: int) -> None:
        self.n, self.n_perturb, self.draw, self.seed = n, n_perturb, draw, seed
        self.drawn: torch.Tensor | None = None
        self.given = 0

    def next(self, x: torch.Tensor) -> torch.Tensor:
        """Perturbations for ``x``: k copies of each input, repeated in place (``repeat_interleave``)."""
        if self.drawn is None:
            generator = torch.Generator().manual_seed(self.seed)
            self.drawn = self.draw((self.n * self.n_perturb, *x.shape[1:]), generator).view(
                self.n, self.n_perturb, *x.shape[1:])
        k = len(x) // self.n
        out = self.drawn[:, self.given:self.given + k].reshape(x.shape)
        self.given += k
        return out


def captum_scores(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, maps: np.ndarray,
                  explain_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], seed: int,
                  n_perturb: int) -> dict[str, float]:
    """Captum ``infidelity`` (noise σ 0.05, normalised) and ``sensitivity_max`` (radius 0.02).

    Both perturb the inputs at random; the perturbations come from generators seeded with
    ``seed``, never from torch's global one, and each copy of each input gets the same
    perturbation however many copies Captum passes at once (see ``max_examples_per_batch``).
    """
    from captum.metrics import infidelity, sensitivity_max

    shape, n = tuple(inputs.shape[1:]), len(inputs)
    noise = _Copies(n, n_perturb, lambda size, draws: 0.05 * torch.randn(size, generator=draws), seed)

    def perturb(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        drawn = noise.next(x)
        return drawn, x - drawn

    radius = 0.02
    ball = _Copies(n, n_perturb, lambda size, draws: torch.empty(size).uniform_(-radius, radius, generator=draws),
                   seed)

    def in_ball(x: torch.Tensor | tuple, perturb_radius: float) -> tuple[torch.Tensor, ...]:
        # Captum's default: uniform noise in the L-infinity ball of the radius (``radius``, drawn by ``ball``).
        tensors = x if isinstance(x, tuple) else (x,)
        return tuple(t + ball.next(t) for t in tensors)

    channels = inputs.shape[1]
    # Contiguous copies: Captum views attributions flat, which an expanded (stride-0) tensor cannot be.
    attributions = (torch.from_numpy(maps)[:, None].expand(-1, channels, *maps.shape[1:]) / channels).contiguous()
    # Each check runs n_perturb copies of the inputs: as many go in one pass as the activation
    # budget allows, within Captum's bounds (the inputs once, at least; all copies, at most).
    with_gradients, without = footprint(model, shape)  # one probe pass for both checks
    gradient_copies, forward_copies = (min(n * n_perturb, max(n, copies_per_pass(bytes_per_copy)))
                                       for bytes_per_copy in (with_gradients, without))
    inf = infidelity(model, perturb, inputs, attributions, target=targets, n_perturb_samples=n_perturb, normalize=True,
                     max_examples_per_batch=forward_copies)

    def explain(x: torch.Tensor | tuple, target: torch.Tensor) -> torch.Tensor | tuple:
        # Captum hands the (perturbed, repeated) inputs over as a tuple. Its first call explains
        # the unperturbed inputs themselves: with one channel, that is ``maps`` (the channel sum
        # of one channel), so the method does not run a second time on them.
        tensor = x[0] if isinstance(x, tuple) else x
        if tensor is inputs and channels == 1:
            out = torch.from_numpy(maps)[:, None].contiguous()
        else:
            out = explain_fn(tensor.detach().clone().requires_grad_(True), target).detach().contiguous()
        return (out,) if isinstance(x, tuple) else out

    sens = sensitivity_max(explain, inputs, perturb_func=in_ball, n_perturb_samples=n_perturb, perturb_radius=radius,
                           target=targets, max_examples_per_batch=gradient_copies)
    return {"infidelity": rounded(float(inf.mean())), "sensitivity_max": rounded(float(sens.mean()))}


def randomised(model: nn.Module, fraction: float, seed: int) -> nn.Module:
    """A copy with the top ``fraction`` of its conv/linear layers re-initialised (cascading from the output).

    Re-initialisation is PyTorch's default for these layers (Kaiming-uniform weights, uniform
    bias), drawn from a generator seeded with ``seed``.
    """
    copy_ = copy.deepcopy(model).eval()
    layers = [m for m in copy_.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear))][::-1]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers[:max(1, round(fraction * len(layers)))]:
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            if layer.bias is not None:
                fan_in = layer.weight[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return copy_


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> float:
    """Structural similarity of two maps scaled to [0, 1] by their max |value| (uniform window)."""
    a = np.abs(a) / (np.abs(a).max() or 1.0)
    b = np.abs(b) / (np.abs(b).max() or 1.0)
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = uniform_filter(a, window), uniform_filter(b, window)
    var_a = uniform_filter(a * a, window) - mu_a**2
    var_b = uniform_filter(b * b, window) - mu_b**2
    cov = uniform_filter(a * b, window) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(value.mean())


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of |a| and |b| (Adebayo et al. compare absolute maps); 0 for flat maps."""
    x, y = np.abs(a).ravel(), np.abs(b).ravel()
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    return float(spearmanr(x, y).statistic)


def similarity(original: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Mean Spearman and SSIM between two stacks of maps (N×H×W or N×D×H×W)."""
    return {"spearman": rounded(float(np.mean([rank_correlation(a, b) for a, b in zip(original, other)]))),
            "ssim": rounded(float(np.mean([ssim(a, b) for a, b in zip(original, other)])))}


def mean_ci(values: np.ndarray, seed: int, n_resamples: int = 1000) -> tuple[float, float, float]:
    """Mean of per-image values and its 95% percentile bootstrap interval (images resampled, seeded)."""
    values = np.asarray(values, dtype=np.float64)
    draws = np.random.default_rng([seed, 13]).integers(0, len(values), (n_resamples, len(values)))
    means = values[draws].mean(axis=1)
    return (rounded(float(values.mean())), rounded(float(np.quantile(means, 0.025))),
            rounded(float(np.quantile(means, 0.975))))


def localisation(maps: np.ndarray, masks: np.ndarray, seed: int) -> dict[str, float | int | bool | None]:
    """Against ground-truth masks, over the images whose mask is not empty: pointing game (the
    map's peak within 1 px of the mask), positive attribution mass in the mask and AUPRC of the
    map against the mask, each a mean with its 95% bootstrap interval, and each one's chance
    level: where a map without information would score (the share of the image a random peak
    would hit; the mask's share of the image). A method localises when its pointing game's
    interval lies above chance."""
    found: dict[str, list[float]] = {key: [] for key in ("pointing_game", "mass_in_mask", "auprc_mask", "hit_chance",
                                                          "area")}
    for attribution, mask in zip(maps, masks):
        region = mask > 0
        if not region.any():
            continue
        near = binary_dilation(region)
        peak = np.unravel_index(np.argmax(attribution), attribution.shape)
        found["pointing_game"].append(float(near[peak]))
        found["mass_in_mask"].append(mass_fraction(attribution, region))
        found["auprc_mask"].append(average_precision(region.ravel(), attribution.ravel()) or 0.0)
        found["hit_chance"].append(float(near.mean()))
        found["area"].append(float(region.mean()))
    out: dict[str, float | int | bool | None] = {"n_masks": len(found["area"])}
    if not found["area"]:
        return {**out, "pointing_game": None, "mass_in_mask": None, "auprc_mask": None, "localisation_pass": None}
    chance = {"pointing_game": float(np.mean(found["hit_chance"])), "mass_in_mask": float(np.mean(found["area"])),
              "auprc_mask": float(np.mean(found["area"]))}
    for key in ("pointing_game", "mass_in_mask", "auprc_mask"):
        mean, low, high = mean_ci(np.array(found[key]), seed)
        out.update({key: mean, f"{key}_ci_low": low, f"{key}_ci_high": high, f"{key}_chance": rounded(chance[key])})
    out["localisation_pass"] = bool(out["pointing_game_ci_low"] > out["pointing_game_chance"])
    return out


def mass_fraction(attribution: np.ndarray, region: np.ndarray, absolute: bool = False) -> float:
    """Share of the map's positive attribution (``absolute``: of its magnitude) inside ``region``.

    Localisation asks where the evidence *for* the explained class lies: positive mass. A
    confounder is a problem whichever way it pushes: a model that learned "marker means
    lesion" explains an unmarked-looking prediction of "normal" with negative attribution on
    the marker, which positive mass would miss; the shortcut check uses the magnitude.
    """
    weight = np.abs(attribution) if absolute else np.clip(attribution, 0, None)
    total = weight.sum()
    return float(weight[region].sum() / total) if total > 0 else 0.0
