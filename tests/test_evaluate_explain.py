"""evaluate and explain on the tiny run: recomputable numbers, validation-only choices, Captum maps."""

import csv
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import evaluate, explain, tasks
from pipeline.core.files import load_npy, read_json, save_npy
from pipeline.evaluation.metrics import HEADLINE, classification_metrics
from pipeline.modeling.networks import ModelConfig, build_model
from pipeline.xai import attributions


def read_predictions(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_every_test_metric_recomputes_from_predictions(tiny_run):
    root, _ = tiny_run
    result = read_json(root / "reports/eval/metrics.json")
    test = result["test"]
    rows = read_predictions(root / "reports/eval/predictions.csv")
    names = ["normal", "lesion"]
    labels = np.array([names.index(r["label"]) for r in rows])
    probs = np.array([[float(r["prob_normal"]), float(r["prob_lesion"])] for r in rows])
    recomputed = classification_metrics(labels, probs, 1, test["threshold"])
    for key in HEADLINE:
        assert test[key] == pytest.approx(recomputed[key], abs=1e-4), key
        if test[key] is not None and test[f"{key}_ci_low"] is not None:
            assert test[f"{key}_ci_low"] <= test[key] + 1e-9 <= test[f"{key}_ci_high"] + 2e-9, key
    assert np.array(test["confusion_matrix"]).sum() == len(rows) == test["n"] == 80
    preds = np.where(probs[:, 1] >= test["threshold"], 1, 0)
    assert [r["prediction"] for r in rows] == [names[p] for p in preds]
    raw = np.array([[float(r["uncalibrated_prob_normal"]), float(r["uncalibrated_prob_lesion"])] for r in rows])
    assert classification_metrics(labels, raw)["brier"] == pytest.approx(result["calibration"]["before"]["brier"], abs=1e-4)


def test_report_sections_of_evaluate(tiny_run):
    root, params = tiny_run
    result = read_json(root / "reports/eval/metrics.json")
    assert set(result["baselines"]) == set(params.evaluate.baselines)
    assert set(result["subgroups"]["site"]) <= {"site-A", "site-B"}
    assert sum(m["n"] for m in result["subgroups"]["site"].values()) == 80
    failures = read_json(root / "reports/eval/failures.json")
    assert set(failures) == {"false_positives", "false_negatives"}
    for row in failures["false_positives"]:
        assert row["label"] == "normal" and row["predicted"] == "lesion" and row["score"] >= result["test"]["threshold"]
    scores = [r["score"] for r in failures["false_positives"]]
    assert scores == sorted(scores, reverse=True)


def test_choices_never_look_at_the_test_split(tiny_run, tmp_path):
    """Scrambling test labels and images changes test metrics but not the threshold or temperature."""
    root, params = tiny_run
    shutil.copytree(root / "data", tmp_path / "data")
    first = evaluate.run(params, tmp_path / "data/prepared", tmp_path / "data/balanced", root / "models/network.pt",
                         tmp_path / "a", tmp_path / "a.pt")
    test_dir = tmp_path / "data/prepared/test"
    save_npy(test_dir / "labels.npy", 1 - load_npy(test_dir / "labels.npy"))
    save_npy(test_dir / "images.npy", load_npy(test_dir / "images.npy")[::-1].copy())
    second = evaluate.run(params, tmp_path / "data/prepared", tmp_path / "data/balanced", root / "models/network.pt",
                          tmp_path / "b", tmp_path / "b.pt")
    assert second["test"]["threshold"] == first["test"]["threshold"]
    assert second["calibration"]["temperature"] == first["calibration"]["temperature"]
    for name in first["baselines"]:
        assert second["baselines"][name]["threshold"] == first["baselines"][name]["threshold"]
    assert second["test"]["roc_auc"] != first["test"]["roc_auc"]


def test_explain_outputs(tiny_run):
    root, params = tiny_run
    samples = read_json(root / "reports/explain/samples.json")
    maps = load_npy(root / "reports/explain/attributions.npy")
    assert len(params.explain.methods) == 7
    assert maps.shape == (7, len(samples["samples"]), 32, 32)
    assert np.isfinite(maps).all()
    assert {s["label"] for s in samples["samples"]} == {"normal", "lesion"}
    # One image per outcome that the test split has, at the model's own decision (as predict makes it).
    available = {kind for kind, n in samples["outcomes_available"].items() if n}
    assert {s["why"] for s in samples["samples"]} >= available
    decided = {r["id"]: r["prediction"] for r in read_predictions(root / "reports/eval/predictions.csv")}
    for sample in samples["samples"]:
        assert sample["predicted"] == decided[sample["id"]], sample
        if sample["why"] in ("true positive", "false negative"):
            assert sample["label"] == "lesion"
        if sample["why"].startswith(("true", "false")):
            assert (sample["why"].startswith("true")) == (sample["label"] == sample["predicted"])
    assert samples["decision"]["rule"] == "threshold" and samples["decision"]["positive_class"] == "lesion"
    assert samples["decision"]["threshold"] == read_json(root / "reports/eval/metrics.json")["test"]["threshold"]
    for sample in samples["samples"]:
        assert (root / "reports/explain/figures" / sample["figure"]).stat().st_size > 1000
    for figure in ("curves.png", "feature_maps.png", "class_images.png"):
        assert (root / "reports/explain/figures" / figure).stat().st_size > 1000
    metrics = read_json(root / "reports/explain/metrics.json")
    for method in params.explain.methods:
        row = metrics["explain"][method]
        for key in ("deletion_auc", "insertion_auc", "infidelity", "sensitivity_max", "randomised_all_layers_spearman",
                    "pointing_game", "mass_in_mask", "auprc_mask", "pointing_game_ci_low", "pointing_game_chance"):
            assert key in row, (method, key)
        assert 0 <= row["deletion_auc"] <= 1 and 0 <= row["insertion_auc"] <= 1
        assert row["sanity_pass"] == (row["randomised_all_layers_spearman"] <= params.explain.sanity_threshold)
        assert row["localisation_pass"] == (row["pointing_game_ci_low"] > row["pointing_game_chance"])
        # Localisation covers every lesion image of the test split, whatever the decision: not just the samples.
        assert row["n_masks"] == samples["localisation"]["images"] == 16 > len(samples["samples"])


def test_samples_are_drawn_per_outcome_seeded():
    labels = np.array([1] * 10 + [0] * 50)
    decisions = np.array([1] * 7 + [0] * 3 + [0] * 48 + [1] * 2)
    binary = tasks.for_data("binary", ["normal", "lesion"])
    index, kinds, targets = binary.explain_units(labels, decisions, 1, 2)
    assert np.array_equal(index, np.arange(60)) and np.array_equal(targets, decisions)
    assert list(kinds[[0, 7, 10, 58]]) == ["true positive", "false negative", "true negative", "false positive"]
    order = binary.outcome_order(1)
    first = explain.select_samples(kinds, order, 4, seed=1)
    assert first == explain.select_samples(kinds, order, 4, seed=1)
    assert first != explain.select_samples(kinds, order, 4, seed=2)
    counts = {kind: sum(why == kind for _, why in first) for kind in order}
    assert counts == {"true positive": 4, "false negative": 3, "true negative": 4, "false positive": 2}
    multi = tasks.for_data("multiclass", ["a", "b", "c"]).explain_units(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 1]),
                                                                         None, 3)[1]
    assert list(multi) == ["correctly classified a image", "misclassified b image", "correctly classified c image",
                           "misclassified c image"]


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
    x = torch.rand(3, 1, 16, 16) * 0.5 + 0.25
    maps = attributions.attribute(OnePixel(), x, torch.ones(3, dtype=torch.long), params.explain, methods=(method,))[method]
    assert maps.shape == (3, 16, 16)
    for attribution in maps:
        assert np.unravel_index(np.abs(attribution).argmax(), attribution.shape) == (5, 9)


def test_random_forest_baseline_probabilities_repeat_exactly():
    from pipeline.evaluation.baselines import fit_predict

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 8, 8, 1), dtype=np.uint8)
    labels = (images.mean(axis=(1, 2, 3)) > 127).astype(np.int64)
    runs = [fit_predict("random_forest", images, labels, np.ones(300), images[:50], labels[:50], images[50:], 0, 2,
                        10_000)[0] for _ in range(3)]
    assert all(np.array_equal(runs[0]["test"], r["test"]) for r in runs[1:])


@pytest.mark.parametrize("name", ["logistic_regression", "svm", "decision_tree"])
def test_baselines_score_in_chunks_and_fit_a_stratified_subsample(name):
    from pipeline.evaluation.baselines import fit_predict, subsample

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (200, 6, 6, 1), dtype=np.uint8)
    labels = (images.mean(axis=(1, 2, 3)) > 127).astype(np.int64)
    whole = fit_predict(name, images, labels, np.ones(200), images[:60], labels[:60], images[60:], 0, 1, 10_000)[0]
    chunked = fit_predict(name, images, labels, np.ones(200), images[:60], labels[:60], images[60:], 0, 1, 10_000,
                          chunk=7)[0]
    np.testing.assert_allclose(chunked["test"], whole["test"], atol=1e-6)  # float32 BLAS blocks by batch shape
    picked = subsample(labels, 50, seed=3)
    assert len(picked) == 50 and np.all(np.diff(picked) > 0)
    assert abs(labels[picked].mean() - labels.mean()) < 0.03
    assert np.array_equal(picked, subsample(labels, 50, seed=3)) and len(subsample(labels, 500, 3)) == 200


def test_five_class_rgb_data_run_through_evaluate_explain_and_report(rgb_run):
    """Multi-class and 3 channels: per-class metrics, every explanation method (Captum's sensitivity
    once crashed on Grad-CAM's expanded RGB maps), and a report whose class names are escaped."""
    root, params = rgb_run
    names = list(params.data.class_names)
    result = read_json(root / "reports/eval/metrics.json")
    assert sorted(result["test"]["roc_auc_per_class"]) == sorted(names)
    assert result["test"]["threshold"] is None and result["test"]["threshold_rule"] == "argmax"
    assert np.array(result["test"]["confusion_matrix"]).shape == (5, 5)
    maps = load_npy(root / "reports/explain/attributions.npy")
    assert maps.shape[0] == len(params.explain.methods) and maps.shape[2:] == (16, 16) and np.isfinite(maps).all()
    metrics = read_json(root / "reports/explain/metrics.json")["explain"]
    for method in params.explain.methods:
        assert np.isfinite(metrics[method]["sensitivity_max"]) and np.isfinite(metrics[method]["infidelity"])
        assert "pointing_game" not in metrics[method]  # no masks outside the phantom
    page = (root / "reports/report.html").read_text()
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "<img src=x" not in page
    assert "the train/val/test splits given in the input file" in page
    assert "License and citation: not known to this pipeline" in page
    assert "simulated phantom" not in page
    card = (root / "reports/model_card.md").read_text()
    assert "&lt;img src=x" in card and "<img src=x" not in card and "正常" in card


@pytest.mark.parametrize("method", ["smoothgrad", "lime"])
def test_random_methods_draw_from_their_own_generator(params, method):
    """Same maps whatever torch's global generator holds, and that generator is left alone."""
    torch.manual_seed(0)
    # SmoothGrad needs a non-linear model (a linear one has the same gradient under any noise); LIME a
    # model whose output a superpixel moves far enough for the Lasso to keep it.
    x = torch.rand(2, 1, 16, 16)
    model = build_model(ModelConfig("small_cnn", 1, 2, 16, 4, 0.5, 0.25)).eval() if method == "smoothgrad" else OnePixel()
    targets = torch.ones(2, dtype=torch.long)
    maps = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        state = torch.random.get_rng_state()
        maps.append(attributions.attribute(model, x, targets, params.explain, seed=3, methods=(method,))[method])
        if method == "smoothgrad":  # LIME's own DataLoader still draws a worker seed from the global generator
            assert torch.equal(state, torch.random.get_rng_state())
    assert np.array_equal(maps[0], maps[1])
    other = attributions.attribute(model, x, targets, params.explain, seed=4, methods=(method,))[method]
    assert not np.array_equal(maps[0], other)
