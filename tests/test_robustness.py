"""The corruption benchmark: each corruption's contract, and what it does to a trained model."""

import dataclasses

import numpy as np
import pytest

from pipeline import evaluate
from pipeline.core.dataset import load_split
from pipeline.core.files import read_json
from pipeline.evaluation import corruptions
from pipeline.modeling.package import load_package


@pytest.mark.parametrize("name", sorted(corruptions.CORRUPTIONS))
@pytest.mark.parametrize("channels", [1, 3])
def test_corruptions_keep_the_format_grow_with_severity_and_are_seeded(name, channels):
    images = (np.random.default_rng(0).random((6, 32, 32, channels)) * 200 + 20).astype(np.uint8)
    assert corruptions.corrupt(images, name, 0, np.random.default_rng(0)) is images  # severity 0: clean
    change = []
    for severity in (1, 2, 3):
        out = corruptions.corrupt(images, name, severity, np.random.default_rng(5))
        assert out.shape == images.shape and out.dtype == np.uint8
        assert np.array_equal(out, corruptions.corrupt(images, name, severity, np.random.default_rng(5)))
        change.append(np.abs(out.astype(float) - images).mean())
    assert 0 < change[0] < change[1] < change[2], change


def test_evaluate_reports_robustness_and_stronger_noise_costs_auc(tiny_run, tmp_path):
    root, params = tiny_run
    robustness = read_json(root / "reports/eval/metrics.json")["robustness"]
    clean = read_json(root / "reports/eval/metrics.json")["test"]
    assert robustness["images"] == len(load_split(root / "data/prepared", "test")["labels"])  # 80 <= 1000: all
    assert robustness["clean"]["roc_auc"] == pytest.approx(clean["roc_auc"], abs=1e-6)
    assert set(robustness["corruptions"]) == set(params.evaluate.corruptions)
    assert all(set(levels) == {"1", "2", "3"} for levels in robustness["corruptions"].values())
    assert (root / "reports/eval/robustness.png").stat().st_size > 0
    page = (root / "reports/report.html").read_text()
    assert "Robustness to image corruptions" in page and f"{robustness['images']} test images, clean" in page
    # On the phantom model: noise strong enough to hide the lesions takes the AUC towards chance.
    package = load_package(root / "models/model.pt")
    test = load_split(root / "data/prepared", "test")
    noisy = evaluate.robustness(dataclasses.replace(params.evaluate, corruptions=("gaussian_noise",)), params.seed,
                                package, test["images"], test["labels"])
    aucs = [noisy["clean"]["roc_auc"], *[noisy["corruptions"]["gaussian_noise"][s]["roc_auc"] for s in ("1", "2", "3")]]
    assert aucs[3] < aucs[0] - 0.05, aucs
