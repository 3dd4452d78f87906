"""evaluate and explain on the tiny run; Captum maps point where a model looks."""

import csv

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import explain
from pipeline.files import load_npy, read_json
from pipeline.metrics import classification_metrics


def test_metrics_file_matches_predictions(tiny_run):
    root, _ = tiny_run
    metrics = read_json(root / "reports/eval/metrics.json")["test"]
    with open(root / "reports/eval/predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == metrics["n"] == 80
    names = ["normal", "lesion"]
    labels = np.array([names.index(r["label"]) for r in rows])
    probs = np.array([[float(r["prob_normal"]), float(r["prob_lesion"])] for r in rows])
    recomputed = classification_metrics(labels, probs)
    for key in ("accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity", "f1"):
        assert metrics[key] == pytest.approx(recomputed[key], abs=1e-5), key
    assert np.array(metrics["confusion_matrix"]).sum() == 80
    assert all(r["prediction"] == names[int(p.argmax())] for r, p in zip(rows, probs))


def test_explain_outputs(tiny_run):
    root, params = tiny_run
    samples = read_json(root / "reports/explain/samples.json")
    maps = load_npy(root / "reports/explain/attributions.npy")
    assert maps.shape == (len(params.explain.methods), len(samples["samples"]), 32, 32)
    assert np.isfinite(maps).all()
    assert {s["label"] for s in samples["samples"]} == {"normal", "lesion"}
    for sample in samples["samples"]:
        assert (root / "reports/explain" / sample["figure"]).stat().st_size > 1000


def test_sample_selection_is_seeded_and_per_class():
    labels = np.array([0] * 50 + [1] * 10 + [2] * 3)
    first = explain.select_samples(labels, 4, seed=1)
    assert np.array_equal(first, explain.select_samples(labels, 4, seed=1))
    assert not np.array_equal(first, explain.select_samples(labels, 4, seed=2))
    assert np.bincount(labels[first]).tolist() == [4, 4, 3]


class OnePixel(nn.Module):
    """Class-1 logit grows with pixel (5, 9) only; a conv layer so Grad-CAM has a layer to read."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1, bias=False)
        nn.init.ones_(self.conv.weight)
        self.cam_layer = self.conv

    def forward(self, x):
        pixel = self.conv(x)[:, 0, 5, 9]
        return torch.stack([torch.zeros_like(pixel), 3 * pixel], dim=1)


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients"])
def test_gradient_methods_point_at_the_pixel_the_model_uses(params, method):
    cfg = params.explain.__class__(methods=(method,), per_class=1, ig_steps=8)
    x = torch.rand(3, 1, 16, 16) * 0.5 + 0.25
    maps = explain.attribute(OnePixel(), x, torch.ones(3, dtype=torch.long), cfg)[method]
    assert maps.shape == (3, 16, 16)
    for attribution in maps:
        assert np.unravel_index(np.abs(attribution).argmax(), attribution.shape) == (5, 9)
