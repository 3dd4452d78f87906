"""Explanation trust measurements on models trained on the phantom, including the shortcut demo."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.dataset import load_split
from pipeline.core.files import read_json
from pipeline.data.phantom import marker_box
from pipeline.modeling.checkpoints import load_checkpoint
from pipeline.modeling.networks import images_to_tensor
from pipeline.xai import attributions, trust
from tests.conftest import run_stages, tiny_params

SMALL = {"data.phantom.image_size": 32, "data.phantom.n_train": 600, "data.phantom.n_val": 100,
         "data.phantom.n_test": 120, "data.phantom.lesion_contrast": 0.35, "data.phantom.lesion_radius": [4.0, 7.0],
         "train.width": 8, "train.epochs": 6, "train.patience": 6, "train.lr": 0.003, "train.batch_size": 32}


def trained(folder, **overrides):
    """A small model trained on a phantom; returns (params, model, test split, meta)."""
    folder.mkdir(parents=True, exist_ok=True)
    params = tiny_params(folder, **{**SMALL, **overrides})
    run_stages(folder, params, ("prepare", "balance", "train"))
    model, _ = load_checkpoint(folder / "models/network.pt")
    return params, model, load_split(folder / "data/prepared", "test"), read_json(folder / "data/prepared/meta.json")


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return trained(tmp_path_factory.mktemp("clean"), **{"data.phantom.shortcut": 0.0})


@pytest.fixture(scope="module")
def shortcut(tmp_path_factory):
    return trained(tmp_path_factory.mktemp("shortcut"), **{"data.phantom.shortcut": 1.0})


def explained(params, model, test, which):
    index = np.flatnonzero(which)[:12]
    inputs = images_to_tensor(test["images"][index])
    with torch.no_grad():
        targets = model(inputs).argmax(1)
    return index, inputs, targets


def test_every_method_gives_finite_maps_of_the_input_shape(clean, params):
    _, model, test, _ = clean
    inputs = images_to_tensor(test["images"][:3])
    maps = attributions.attribute(model, inputs, torch.tensor([0, 1, 1]), params.explain)
    assert set(maps) == set(params.explain.methods)
    for method, m in maps.items():
        assert m.shape == (3, 32, 32) and np.isfinite(m).all(), method
        assert np.abs(m).sum() > 0, method


def test_saliency_deletion_beats_random_order(clean):
    params, model, test, _ = clean
    _, inputs, targets = explained(params, model, test, test["labels"] == 1)
    maps = attributions.attribute(model, inputs, targets, params.explain, methods=("saliency",))
    result = trust.faithfulness(model, inputs, targets, maps, 10, seed=0)
    assert result["saliency"]["deletion_auc"] < result["random"]["deletion_auc"]
    assert result["saliency"]["insertion_auc"] > result["random"]["insertion_auc"]


@pytest.mark.parametrize("method", ["saliency", "smoothgrad", "lime"])
def test_sensitivity_reuses_the_maps_of_the_unperturbed_inputs(clean, method):
    """captum_scores hands Captum the maps already made for the inputs instead of running the
    method on them again; the scores equal Captum's own run of the method on them."""
    from captum.metrics import sensitivity_max

    params, model, test, _ = clean
    _, inputs, targets = explained(params, model, test, np.ones(len(test["labels"]), bool))
    inputs, targets = inputs[:4], targets[:4]
    maps = attributions.attribute(model, inputs, targets, params.explain, seed=3, methods=(method,))[method]
    fn = attributions.explainer(method, model, params.explain, tuple(inputs.shape[1:]), 3)
    calls = []

    def counted(x, target):
        calls.append(len(x))
        return fn(x, target)

    scores = trust.captum_scores(model, inputs, targets, maps, counted, seed=0, n_perturb=2)
    assert calls == [8], "only the 2 x 4 perturbed inputs are explained"
    ball = torch.Generator().manual_seed(0)
    fresh = attributions.explainer(method, model, params.explain, tuple(inputs.shape[1:]), 3)

    def plain(x, target):  # Captum passes a tensor or a tuple, and expects the same back
        tensor = x[0] if isinstance(x, tuple) else x
        out = fresh(tensor.detach().clone().requires_grad_(True), target).detach().contiguous()
        return (out,) if isinstance(x, tuple) else out

    def in_ball(x, perturb_radius):
        tensors = x if isinstance(x, tuple) else (x,)
        return tuple(t + torch.empty(t.shape).uniform_(-perturb_radius, perturb_radius, generator=ball)
                     for t in tensors)

    expected = sensitivity_max(plain, inputs, perturb_func=in_ball, n_perturb_samples=2, perturb_radius=0.02,
                               target=targets)
    assert scores["sensitivity_max"] == pytest.approx(float(expected.mean()), abs=2e-6)


def test_randomising_the_model_changes_gradient_maps(clean):
    params, model, test, _ = clean
    _, inputs, targets = explained(params, model, test, np.ones(len(test["labels"]), bool))
    for method in ("saliency", "grad_cam"):
        original = attributions.attribute(model, inputs, targets, params.explain, methods=(method,))[method]
        shuffled = attributions.attribute(trust.randomised(model, 1.0, 0), inputs, targets, params.explain,
                                          methods=(method,))[method]
        assert trust.similarity(original, shuffled)["spearman"] < 0.5, method
        assert trust.similarity(original, original)["spearman"] == pytest.approx(1.0)


def test_shortcut_marker_draws_attribution_only_when_it_predicts_the_label(clean, shortcut):
    masses = {}
    for name, (params, model, test, meta) in (("p=0", clean), ("p=1", shortcut)):
        assert meta["marker_box"] == list(marker_box(32))
        _, inputs, _ = explained(params, model, test, test["markers"] == 1)
        targets = torch.ones(len(inputs), dtype=torch.long)  # what drives the lesion score?
        top, bottom, left, right = meta["marker_box"]
        region = np.zeros((32, 32), bool)
        region[top:bottom, left:right] = True
        # Pixel-resolution methods: Grad-CAM's 4×4 feature map at 32 px cannot resolve a 2×2 marker.
        maps = attributions.attribute(model, inputs, targets, params.explain,
                                      methods=("saliency", "integrated_gradients"))
        masses[name] = {m: np.mean([trust.mass_fraction(a, region) for a in maps[m]]) for m in maps}
    threshold = clean[0].explain.shortcut_threshold
    for method in ("saliency", "integrated_gradients"):
        assert masses["p=1"][method] > 5 * masses["p=0"][method], (method, masses)
        assert masses["p=1"][method] > threshold > masses["p=0"][method], (method, masses)


def test_ssim_and_rank_correlation_basics():
    rng = np.random.default_rng(0)
    a = rng.random((16, 16))
    assert trust.ssim(a, a) == pytest.approx(1.0) and trust.rank_correlation(a, a) == pytest.approx(1.0)
    assert abs(trust.rank_correlation(a, rng.random((16, 16)))) < 0.3
    assert trust.rank_correlation(np.zeros((4, 4)), a[:4, :4]) == 0.0


def test_marker_mass_counts_evidence_against_the_class_too():
    region = np.zeros((4, 4), bool)
    region[0, 0] = True
    attribution = np.full((4, 4), 0.1)
    attribution[0, 0] = -1.5  # the marker pushes away from the explained class
    assert trust.mass_fraction(attribution, region) == 0.0
    assert trust.mass_fraction(attribution, region, absolute=True) == pytest.approx(1.5 / 3.0)


def test_localisation_on_a_map_equal_to_the_mask():
    mask = np.zeros((3, 8, 8), np.uint8)
    mask[:, 2:4, 2:4] = 1
    mask[2] = 0  # an image without a lesion is not counted
    perfect = trust.localisation(mask.astype(float), mask, seed=0)
    for key in ("pointing_game", "mass_in_mask", "auprc_mask"):
        assert perfect[key] == perfect[f"{key}_ci_low"] == perfect[f"{key}_ci_high"] == 1.0, key
    assert perfect["n_masks"] == 2 and perfect["localisation_pass"] is True
    # Chance: a random peak hits the 2×2 mask grown by one 4-connected pixel (12 pixels) in 12 of 64; the mask is 4.
    assert perfect["pointing_game_chance"] == 0.1875 and perfect["mass_in_mask_chance"] == perfect["auprc_mask_chance"] == 0.0625
    inverse = trust.localisation(1.0 - mask, mask, seed=0)
    assert inverse["pointing_game"] == 0.0 and inverse["mass_in_mask"] == 0.0 and inverse["localisation_pass"] is False
    assert trust.localisation(np.ones((1, 8, 8)), np.zeros((1, 8, 8)), seed=0) == {
        "n_masks": 0, "pointing_game": None, "mass_in_mask": None, "auprc_mask": None, "localisation_pass": None}


def test_localisation_interval_is_a_seeded_bootstrap_of_the_images():
    rng = np.random.default_rng(0)
    masks = np.zeros((40, 8, 8), np.uint8)
    masks[:, 3:5, 3:5] = 1
    maps = rng.random((40, 8, 8))
    maps[:20, 3, 3] = 2.0  # half the maps peak in the mask
    first = trust.localisation(maps, masks, seed=1)
    assert first == trust.localisation(maps, masks, seed=1)
    assert first["pointing_game_ci_low"] < 0.5 <= first["pointing_game"] < first["pointing_game_ci_high"]
    assert 0.3 < first["pointing_game_ci_low"] and first["pointing_game_ci_high"] < 0.7
