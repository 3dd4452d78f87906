"""Stage 5, explain: Captum attributions for a seeded, fixed sample of test images per class.

Methods (``explain.methods``): ``saliency`` (absolute input gradient), ``integrated_gradients``
(black-image baseline, ``explain.ig_steps`` steps, batched) and ``grad_cam`` (LayerGradCam on
the last convolutional feature map, upsampled bilinearly to the image). Each map explains the
class the model predicted, the decision a reader wants to understand.

Writes ``reports/explain/``: one PNG per sample (image, then each method's map blended over
it, the lesion outline where a ground-truth mask exists), ``attributions.npy`` (the raw maps,
methods × samples × H × W, in the order of ``samples.json``) and ``samples.json`` (which
images, their labels, predictions and figures).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import paths
from pipeline.files import save_npy, staged_dir, write_json
from pipeline.models import Classifier, images_to_tensor, load_checkpoint
from pipeline.params import ExplainParams, Params
from pipeline.plots import plot_attributions
from pipeline.runtime import configure_torch, stage_main
from pipeline.splits import load_meta, load_split

log = logging.getLogger(__name__)

METHOD_TITLES = {"saliency": "Saliency", "integrated_gradients": "Integrated Gradients", "grad_cam": "Grad-CAM"}


def select_samples(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Up to ``per_class`` test indices per class, drawn with a generator seeded from ``seed``."""
    rng = np.random.default_rng([seed, 5])
    chosen = []
    for k in np.unique(labels):
        members = np.flatnonzero(labels == k)
        chosen.extend(sorted(rng.choice(members, size=min(per_class, len(members)), replace=False).tolist()))
    return np.asarray(chosen, dtype=np.int64)


def attribute(model: Classifier, inputs: torch.Tensor, targets: torch.Tensor, cfg: ExplainParams) -> dict[str, np.ndarray]:
    """One N×H×W map per method (channels summed), same height and width as the input."""
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Saliency

    maps = {}
    for method in cfg.methods:
        x = inputs.clone().requires_grad_(True)
        if method == "saliency":
            attr = Saliency(model).attribute(x, target=targets, abs=True)
        elif method == "integrated_gradients":
            attr = IntegratedGradients(model).attribute(x, baselines=0.0, target=targets, n_steps=cfg.ig_steps,
                                                        internal_batch_size=len(x) * cfg.ig_steps)
        else:
            cam = LayerGradCam(model, model.cam_layer).attribute(x, target=targets, relu_attributions=True)
            attr = LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode="bilinear")
        maps[method] = attr.detach().sum(dim=1).numpy()
    return maps


def run(params: Params, prepared: Path = paths.PREPARED, model_path: Path = paths.MODEL,
        out_dir: Path = paths.EXPLAIN_DIR) -> dict[str, Any]:
    configure_torch(params.train.threads)
    cfg = params.explain
    names = load_meta(prepared)["class_names"]
    model, _ = load_checkpoint(model_path)
    test = load_split(prepared, "test")
    chosen = select_samples(test["labels"], cfg.per_class, params.seed)
    inputs = images_to_tensor(test["images"][chosen])
    with torch.no_grad():
        probs = torch.softmax(model(inputs), dim=1)
    targets = probs.argmax(dim=1)
    log.info("explaining %d test images with %s", len(chosen), ", ".join(cfg.methods))
    maps = attribute(model, inputs, targets, cfg)
    samples = []
    with staged_dir(out_dir) as tmp:
        for row, index in enumerate(chosen):
            sample_id = str(test["ids"][index])
            label, pred = int(test["labels"][index]), int(targets[row])
            figure = f"{sample_id}.png"
            title = f"{sample_id}: true {names[label]}, predicted {names[pred]} (p={float(probs[row, pred]):.3f})"
            mask = test["masks"][index] if "masks" in test else None
            plot_attributions(inputs[row].permute(1, 2, 0).numpy(), {METHOD_TITLES[m]: maps[m][row] for m in cfg.methods},
                              title, tmp / figure, mask)
            samples.append({"id": sample_id, "label": names[label], "predicted": names[pred],
                            "probability": round(float(probs[row, pred]), 6), "figure": figure})
        # One .npy (not .npz: zip entries carry timestamps) so equal runs give equal bytes.
        save_npy(tmp / "attributions.npy", np.stack([maps[m] for m in cfg.methods]).astype(np.float32))
        summary = {"methods": list(cfg.methods), "ig_steps": cfg.ig_steps, "target": "predicted class",
                   "samples": samples}
        write_json(tmp / "samples.json", summary)
    return summary


def main() -> None:
    stage_main(__doc__.splitlines()[0], run)


if __name__ == "__main__":
    main()
