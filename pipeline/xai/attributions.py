"""Attribution maps: Captum's methods behind one batched call, plus the seed's two visualisations.

Every method returns one H×W map per image (channels summed) explaining ``targets``; for
volumes one D×H×W map, with the same methods in 3-D (Grad-CAM interpolated trilinearly,
occlusion with cubic patches, LIME on a grid of cubes):
- ``saliency``: |∂logit/∂x| (Simonyan et al. 2014);
- ``integrated_gradients``: black baseline, ``ig_steps`` steps, Captum's internal batching;
- ``smoothgrad``: Saliency averaged over noisy copies (as Captum's ``NoiseTunnel``, with seeded noise);
- ``grad_cam``: ``LayerGradCam`` on the last conv feature map, bilinearly upsampled;
- ``guided_grad_cam``: Grad-CAM times guided backpropagation (Captum ``GuidedGradCam``);
- ``occlusion``: drop in the target's logit when a square patch is blacked out (patches tile
  the image without overlap; in volumes cubes, as many in all as squares in an image);
- ``lime``: Captum ``Lime`` on a grid of square superpixels (in volumes, as many cubes).
Feature maps (activations of each conv layer) and gradient-ascent class images are the seed's
own visualisations.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from pipeline.core.config import ExplainParams

TITLES = {"saliency": "Saliency", "integrated_gradients": "Integrated Gradients", "smoothgrad": "SmoothGrad",
          "grad_cam": "Grad-CAM", "guided_grad_cam": "Guided Grad-CAM", "occlusion": "Occlusion", "lime": "LIME"}


def grid_mask(spatial: tuple[int, ...], cells: int) -> torch.Tensor:
    """LIME's features: an integer label per pixel (voxel) for a grid of ``cells`` squares (cubes) per axis."""
    index = np.zeros(spatial, dtype=np.int64)
    for axis, length in enumerate(spatial):
        position = np.minimum(np.arange(length) * cells // length, cells - 1)
        index = index * cells + position.reshape([-1 if a == axis else 1 for a in range(len(spatial))])
    return torch.from_numpy(index)


def per_axis(image_setting: float, ndim: int) -> float:
    """An image's per-axis setting carried to ``ndim`` axes with as many cells in all.

    ``explain.lime_grid`` and ``explain.occlusion_window`` are given per axis of an image (8
    cells, or patches 1/8 of the side: 64 in all); a volume gets the per-axis value that keeps
    64 in all (4 cubes per axis, patches 1/4 of the side), so LIME's ``lime_samples`` still
    fit its linear model and occlusion costs a volume about what it costs an image, not eight
    times the forward passes.
    """
    return image_setting ** (2 / ndim)


def interpolation(ndim: int) -> str:
    return "bilinear" if ndim == 2 else "trilinear"


Explainer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (inputs N×C×…, targets N) → N×C×…


# Many methods run many copies of each image through the network at once: Integrated
# Gradients' steps and SmoothGrad's noisy samples with gradients, occlusion's and LIME's
# perturbed copies without, and Captum's infidelity and sensitivity checks on top. What each
# copy holds bounds how many go in one pass: with DenseNet-121 at 128 px, SmoothGrad's 576
# copies held 23.5 GB and occlusion under the sensitivity check 9.5 GB. The default small CNN
# at 64 px holds about 2 MB per copy with gradients and 0.75 MB without, so none of its passes
# (at most 576 and 1,024 copies) is split and its maps keep their bytes.
ACTIVATION_BUDGET = 2 * 1024**3


def _nbytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(_nbytes(v) for v in value) if isinstance(value, (tuple, list)) else 0


@torch.no_grad()
def footprint(model: nn.Module, shape: tuple[int, ...]) -> tuple[int, int]:
    """Bytes one input of ``shape`` holds in a pass through ``model``: (with gradients, without).

    With gradients, every leaf module's output stays for the backward pass: their sum. Without,
    a module's inputs and output live together while it runs, and its callers' inputs beside
    them: twice the largest inputs + output of any module (DenseNet-121 at 128 px: 4 MB
    estimated, 3.8 MB measured per occluded copy). Measured in eval mode, so batch norms'
    running statistics stay as they are.
    """
    leaves, largest, training = [0], [0], model.training

    def hook(module: nn.Module, inputs: tuple, output: object) -> None:
        if not list(module.children()):
            leaves[0] += _nbytes(output)
        largest[0] = max(largest[0], _nbytes(inputs) + _nbytes(output))
    hooks = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        model.eval()(torch.zeros(1, *shape))
    finally:
        model.train(training)
        for handle in hooks:
            handle.remove()
    return leaves[0], 2 * largest[0]


def copies_per_pass(bytes_per_copy: int) -> int:
    """How many copies of ``bytes_per_copy`` each (see :func:`footprint`) fit in :data:`ACTIVATION_BUDGET`."""
    return max(1, ACTIVATION_BUDGET // max(1, bytes_per_copy))


def images_per_pass(model: nn.Module, shape: tuple[int, ...], gradients: bool = True) -> int:
    """How many inputs one pass, with or without gradients, may hold within :data:`ACTIVATION_BUDGET`."""
    with_gradients, without = footprint(model, shape)
    return copies_per_pass(with_gradients if gradients else without)


def _saliency(model: nn.Module, cfg: ExplainParams, shape: tuple[int, int, int], seed: int) -> Explainer:
    from captum.attr import Saliency

    return lambda x, t: Saliency(model).attribute(x, target=t, abs=True)


def _integrated_gradients(model: nn.Module, cfg: ExplainParams, shape: tuple[int, int, int], seed: int) -> Explainer:
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(model)
    per_pass = min(4 * cfg.ig_steps, images_per_pass(model, shape))
    # Captum's least is one step of every input at once (fewer, and it warns and takes that).
    return lambda x, t: ig.attribute(x, baselines=0.0, target=t, n_steps=cfg.ig_steps,
                                     internal_batch_size=max(len(x), per_pass))


def _smoothgrad(model: nn.Module, cfg: ExplainParams, shape: tuple[int, int, int], seed: int) -> Explainer:
    """Saliency averaged over ``smoothgrad_samples`` noisy copies (Smilkov et al. 2017).

    What Captum's ``NoiseTunnel(Saliency)`` computes, with the noise drawn from an explicit
    generator (NoiseTunnel draws from torch's global one): each call starts from ``seed``, so
    the noise is part of the explanation's definition and maps are reproducible.
    """
    from captum.attr import Saliency

    saliency = Saliency(model)
    per_pass = images_per_pass(model, shape)

    def smooth(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        n = cfg.smoothgrad_samples
        noisy = x.detach().repeat_interleave(n, dim=0)
        noisy = noisy + cfg.smoothgrad_stdev * torch.randn(noisy.shape, generator=generator)
        targets = t.repeat_interleave(n)
        maps = torch.cat([saliency.attribute(noisy[i:i + per_pass].requires_grad_(True), target=targets[i:i + per_pass],
                                             abs=True) for i in range(0, len(noisy), per_pass)])
        return maps.view(len(x), n, *x.shape[1:]).mean(dim=1)
    return smooth


def cam_layers(model: nn.Module) -> list[nn.Module]:
    """The layers Grad-CAM reads: the network's last feature map, or each ensemble member's (their
    maps of the ensemble's output are averaged)."""
    return list(getattr(model, "cam_layers", None) or [model.cam_layer])


def _grad_cam(model: nn.Module, cfg: ExplainParams, shape: tuple[int, int, int], seed: int) -> Explainer:
    from captum.attr import LayerAttribution, LayerGradCam

    channels, *spatial = shape
    cams = [LayerGradCam(model, layer) for layer in cam_layers(model)]
    return lambda x, t: sum(LayerAttribution.interpolate(
        cam.attribute(x, target=t, relu_attributions=True), tuple(spatial), interpolate_mode=interpolation(len(spatial))
    ) for cam in cams).expand(-1, channels, *spatial) / (channels * len(cams))


def _guided_grad_cam(model: nn.Module, cfg: ExplainParams, shape: tuple[int, int, int], seed: int) -> Explainer:
    from captum.attr import GuidedGradCam

    guided = [GuidedGradCam(model, layer) for layer in cam_layers(model)]

    def guided_cam(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():  # Captum announces its temporary ReLU hooks on every call
            warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
            return sum(g.attribute(x, target=t, interpolate_mode=interpolation(len(shape) - 1))
                       for g in guided) / len(guided)
    return guided_cam


def _occlusion(model: nn.Module, cfg: ExplainParams, shape: tuple[int, int, int], seed: int) -> Explainer:
    from captum.attr import Occlusion

    channels, height = shape[:2]
    patch = (channels, *[max(2, round(per_axis(cfg.occlusion_window, len(shape) - 1) * height))] * (len(shape) - 1))
    occlusion = Occlusion(model)
    copies = images_per_pass(model, shape, gradients=False)  # occluded copies of the whole batch per pass
    return lambda x, t: occlusion.attribute(x, sliding_window_shapes=patch, strides=patch, baselines=0.0, target=t,
                                            perturbations_per_eval=min(64, max(1, copies // len(x))))


def _lime(model: nn.Module, cfg: ExplainParams, shape: tuple[int, int, int], seed: int) -> Explainer:
    """Captum ``Lime`` on a grid of square superpixels; its random on/off samples come from an
    explicit generator that restarts from ``seed`` on every call, so maps are reproducible."""
    from captum.attr import Lime

    channels, *spatial = shape
    features = grid_mask(tuple(spatial), max(2, round(per_axis(cfg.lime_grid, len(spatial)))))
    draws = {"generator": torch.Generator()}

    def perturb(original: torch.Tensor, **kwargs: object) -> torch.Tensor:
        # Captum's default (each superpixel kept with probability 1/2), from our generator.
        probs = torch.full((1, int(kwargs["num_interp_features"])), 0.5)
        return torch.bernoulli(probs, generator=draws["generator"]).long()

    lime = Lime(model, perturb_func=perturb)
    cells = features.reshape(-1)
    per_pass = min(64, images_per_pass(model, shape, gradients=False))

    def superpixels_kept(sample: torch.Tensor, original: torch.Tensor, **kwargs: object) -> torch.Tensor:
        # Captum's default transform, bit for bit (each pixel kept or set to the baseline, 0),
        # without its advanced indexing by an expanded mask: 5 ms per sample there against
        # 0.04 ms, and far slower when the CPU is shared (16.7 of 104 s of explain while
        # another job ran; on a quiet machine explain takes 31.4 s against 32.0 s).
        keep = sample[0].to(original.dtype)[cells].reshape(1, 1, *spatial)
        return original * keep
    lime.from_interp_rep_transform = superpixels_kept

    def explain_lime(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        draws["generator"].manual_seed(seed)
        return torch.cat([lime.attribute(x[i:i + 1], baselines=0.0, target=t[i:i + 1],
                                         feature_mask=features.expand(1, channels, *spatial),
                                         n_samples=cfg.lime_samples, perturbations_per_eval=per_pass)
                          for i in range(len(x))])
    return explain_lime


# ``explain.methods``: name → builder of an :data:`Explainer` for one model and input shape.
METHODS: dict[str, Callable[[nn.Module, ExplainParams, tuple[int, ...], int], Explainer]] = {
    "saliency": _saliency,
    "integrated_gradients": _integrated_gradients,
    "smoothgrad": _smoothgrad,
    "grad_cam": _grad_cam,
    "guided_grad_cam": _guided_grad_cam,
    "occlusion": _occlusion,
    "lime": _lime,
}


def explainer(method: str, model: nn.Module, cfg: ExplainParams, shape: tuple[int, ...], seed: int) -> Explainer:
    """A function (inputs N×C×H×W, targets N) → attributions N×C×H×W for ``method`` (volumes: N×C×D×H×W)."""
    return METHODS[method](model, cfg, shape, seed)


def attribute(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, cfg: ExplainParams,
              seed: int = 0, methods: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """One N×H×W (volumes N×D×H×W) float32 map per method, computed in batches of ``cfg.batch_size``."""
    model.eval()
    maps = {}
    for method in methods or cfg.methods:
        fn = explainer(method, model, cfg, tuple(inputs.shape[1:]), seed)
        chunks = []
        for start in range(0, len(inputs), cfg.batch_size):
            x = inputs[start:start + cfg.batch_size].clone().requires_grad_(True)
            chunks.append(fn(x, targets[start:start + cfg.batch_size]).detach().sum(dim=1))
        maps[method] = torch.cat(chunks).float().numpy()
    return maps


def feature_maps(model: nn.Module, image: torch.Tensor) -> list[tuple[str, np.ndarray]]:
    """Activations (C×H×W, volumes C×D×H×W) after each convolution for one image: the seed's feature-map view."""
    found: list[tuple[str, np.ndarray]] = []
    hooks = [module.register_forward_hook(lambda m, i, o, name=name: found.append((name, o[0].detach().numpy())))
             for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Conv3d))]
    try:
        with torch.no_grad():
            model(image[None])
    finally:
        for hook in hooks:
            hook.remove()
    return found


def class_image(model: nn.Module, target: int, shape: tuple[int, ...], steps: int, seed: int,
                lr: float = 0.05, l2: float = 0.01, blur_every: int = 10) -> np.ndarray:
    """Gradient ascent on the input to maximise one class's logit (the seed's class visualisation).

    Regularised towards mid-grey by an L2 penalty and a light blur every ``blur_every`` steps,
    so the image shows structure rather than adversarial noise; kept in [0, 1].
    """
    generator = torch.Generator().manual_seed(seed + target)
    x = (0.5 + 0.01 * torch.randn((1, *shape), generator=generator)).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr, fused=True)  # fused: no MKL vector-math sqrt (pipeline.core.kernels)
    taps = torch.tensor([1.0, 2.0, 1.0]) / 4
    blur = taps[:, None] * taps[None, :] if len(shape) == 3 else taps[:, None, None] * taps[None, :, None] * taps
    convolve = nn.functional.conv2d if len(shape) == 3 else nn.functional.conv3d
    model.eval()
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        loss = -model(x)[0, target] + l2 * ((x - 0.5) ** 2).sum()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            if step % blur_every == 0:
                x.copy_(convolve(x, blur.expand(shape[0], 1, *blur.shape), padding=1, groups=shape[0]))
            x.clamp_(0, 1)
    return x.detach()[0].movedim(0, -1).numpy()
