"""The corruption benchmark: each corruption's contract, and what it does to a trained model."""

import numpy as np
import pytest

from pipeline import evaluate
from pipeline.core.dataset import load_split
from pipeline.core.files import read_json
from pipeline.evaluation import corruptions
from pipeline.modeling.package import load_package
from tests.conftest import run_stages, tiny_params


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


def test_pixelate_averages_the_area_each_coarse_pixel_covers():
    image = (np.arange(16, dtype=np.uint8) * 10).reshape(1, 4, 4, 1)
    out = corruptions.pixelate(image, 0.5, np.random.default_rng(0))[0, ..., 0]
    np.testing.assert_array_equal(out, np.repeat(np.repeat([[25, 45], [105, 125]], 2, axis=0), 2, axis=1))
    np.testing.assert_allclose(corruptions._area_weights(3, 2), [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]], rtol=1e-6)
    volume = np.stack([image[0]] * 3)[None]  # 1×3×4×4×1: every axial slice pixelated in-plane
    assert (corruptions.pixelate(volume, 0.5, np.random.default_rng(0))[0, :, ..., 0] == out).all()


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


def test_stronger_noise_costs_a_trained_model_more_auc(tmp_path):
    """On a phantom model that has learnt its task (the session's tiny model is near chance, where
    AUC differences are noise): noise strong enough to hide the lesions takes the AUC towards chance."""
    params = tiny_params(tmp_path, **{"data.phantom.lesion_contrast": 0.5, "data.phantom.n_test": 300,
                                      "train.epochs": 10, "train.patience": 10, "train.width": 8,
                                      "evaluate.corruptions": ["gaussian_noise"], "evaluate.baselines": []})
    run_stages(tmp_path, params, ("prepare", "balance", "train", "evaluate"))
    package = load_package(tmp_path / "models/model.pt")
    test = load_split(tmp_path / "data/prepared", "test")
    noisy = evaluate.robustness(params.evaluate, params.seed, package, test["images"], test["labels"])
    aucs = [noisy["clean"]["roc_auc"], *[noisy["corruptions"]["gaussian_noise"][s]["roc_auc"] for s in ("1", "2", "3")]]
    assert aucs[0] > 0.8 and aucs[1] > aucs[3] and aucs[3] < aucs[0] - 0.05, aucs
