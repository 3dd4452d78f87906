"""MONAI's networks as train.model choices: shapes, small-image stems, Grad-CAM layers, BN folding,
group norm for DP-SGD and DDP, checkpoints, pretrained weights, and one run through every stage."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from captum.attr import GuidedGradCam, LayerGradCam
from torch import nn

from pipeline import predict
from pipeline.core.config import PretrainedParams
from pipeline.core.dataset import load_split
from pipeline.core.errors import PipelineError
from pipeline.modeling import pretrained
from pipeline.modeling.checkpoints import load_checkpoint, save_checkpoint
from pipeline.modeling.networks import MONAI_NETWORKS, ModelConfig, build_model, count_parameters, folded
from pipeline.reporting.content import initialisation_text
from tests.conftest import STAGES_TO_REPORT, run_stages, tiny_params


def config(name: str, size: int = 28, ndim: int = 2, norm: str = "batch", classes: int = 2, channels: int = 1):
    return ModelConfig(name=name, in_channels=channels, num_classes=classes, image_size=size, width=8, mean=0.4,
                       std=0.2, norm=norm, ndim=ndim)


@pytest.mark.parametrize("name", MONAI_NETWORKS)
def test_monai_network_trains_explains_and_folds_at_28_px(name):
    torch.manual_seed(0)
    model = build_model(config(name, classes=3, channels=3))
    x = torch.rand(4, 3, 28, 28)
    logits = model(x)
    assert logits.shape == (4, 3)
    nn.functional.cross_entropy(logits, torch.arange(4) % 3).backward()
    before = [p.detach().clone() for p in model.parameters()]
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    assert sum(not torch.equal(a, b) for a, b in zip(before, model.parameters())) > len(before) // 2
    assert not any(getattr(m, "inplace", False) for m in model.modules())  # Captum's hooks need out-of-place
    model.eval()
    cam = LayerGradCam(model, model.cam_layer).attribute(x, target=1)
    assert cam.shape[:2] == (4, 1) and 1 < cam.shape[-1] < 28 and cam.abs().sum() > 0  # the last feature map
    predicted = model(x).argmax(dim=1)  # Guided Grad-CAM keeps positive evidence: the decision's class has some
    guided = GuidedGradCam(model, model.cam_layer).attribute(x.clone().requires_grad_(True), target=predicted)
    assert guided.shape == x.shape and torch.isfinite(guided).all() and guided.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(folded(model)(x), model(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.to(memory_format=torch.channels_last)(x.contiguous(
            memory_format=torch.channels_last)), model(x), atol=1e-4, rtol=1e-4)  # train.channels_last


@pytest.mark.parametrize("name", MONAI_NETWORKS)
def test_group_norm_variant_has_no_batch_norm_and_trains_under_opacus(name):
    """Opacus' validator passes it and its per-image gradients add up to the batch gradient
    (MONAI's in-place residual sums would break them: the wrapper adds out of place)."""
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    torch.manual_seed(0)
    model = build_model(config(name, norm="group"))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert ModuleValidator.validate(model, strict=False) == []
    sampled = GradSampleModule(model)
    nn.functional.cross_entropy(sampled(torch.rand(3, 1, 28, 28)), torch.tensor([0, 1, 0])).backward()
    for p in model.parameters():
        torch.testing.assert_close(p.grad_sample.mean(dim=0), p.grad, atol=1e-4, rtol=1e-3)
    sampled._close()


@pytest.mark.parametrize("name", MONAI_NETWORKS)
def test_monai_network_takes_volumes(name):
    torch.manual_seed(0)
    model = build_model(config(name, size=28, ndim=3)).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 28, 28, 28)).shape == (1, 2)
    assert any(isinstance(m, nn.Conv3d) for m in model.modules())
    assert not any(isinstance(m, nn.Conv2d) for m in model.modules())


def test_small_images_get_a_small_stem_large_ones_imagenets():
    small, large = build_model(config("densenet121", 28)).net.net, build_model(config("densenet121", 128)).net.net
    assert small.features.conv0.kernel_size == (3, 3) and small.features.conv0.stride == (1, 1)
    assert isinstance(small.features.pool0, nn.Identity)
    assert large.features.conv0.kernel_size == (7, 7) and large.features.conv0.stride == (2, 2)
    with torch.no_grad():  # 28 → 14 → 7 → 3 through three transitions: a map Grad-CAM can read
        assert small.features(torch.rand(1, 1, 28, 28)).shape[-2:] == (3, 3)


def test_monai_resnet18_is_the_hand_written_one_in_monai():
    """Same layout, same parameter count at every width: MONAI's ResNet-18 can replace ours."""
    for width in (8, 64):
        ours = build_model(ModelConfig("resnet18", 1, 2, 28, width, 0.4, 0.2))
        theirs = build_model(ModelConfig("monai_resnet18", 1, 2, 28, width, 0.4, 0.2))
        assert count_parameters(ours) == count_parameters(theirs)


def test_monai_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model(config("efficientnet_b0", classes=4)).eval()
    save_checkpoint(tmp_path / "m.pt", model, {"best_epoch": 1})
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x))


# --- train.pretrained ------------------------------------------------------------------------

def weights_file(path, name="densenet121", classes=3, bare=False, seed=1):
    torch.manual_seed(seed)
    model = build_model(config(name, classes=classes))
    state = model.net.net.state_dict() if bare else model.state_dict()
    torch.save(state, path)
    return model, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("bare", [False, True])
def test_pretrained_loads_every_matching_tensor_and_leaves_the_head(tmp_path, bare):
    source, sha = weights_file(tmp_path / "w.pt", classes=3, bare=bare)
    torch.manual_seed(2)
    target = build_model(config("densenet121", classes=2))
    found = pretrained.load(target, PretrainedParams(str(tmp_path / "w.pt"), None, "a test set"))
    head = {"net.net.class_layers.out.weight", "net.net.class_layers.out.bias"}
    assert set(found["not_loaded"]) == head and found["sha256"] == sha
    assert found["loaded"] == found["tensors"] - 2
    ours, theirs = target.state_dict(), source.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k not in head | {"mean", "std"})
    assert not torch.equal(ours["net.net.class_layers.out.weight"], theirs["net.net.class_layers.out.weight"][:2])
    text = initialisation_text("densenet121", found)
    assert f"{found['loaded']} of {found['tensors']} tensors loaded" in text and sha in text and "a test set" in text


def test_pretrained_url_is_fetched_once_into_the_cache_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDCNN_CACHE", str(tmp_path / "cache"))
    _, sha = weights_file(tmp_path / "w.pt", "resnet50")
    url = (tmp_path / "w.pt").as_uri()
    first, digest = pretrained.resolve(PretrainedParams(url, sha, None))
    assert digest == sha and first.parent == tmp_path / "cache" / "weights"
    assert first.read_bytes() == (tmp_path / "w.pt").read_bytes()
    (tmp_path / "w.pt").unlink()  # the cached copy is used from now on
    assert pretrained.resolve(PretrainedParams(url, sha, None)) == (first, sha)
    weights_file(tmp_path / "other.pt", "resnet50", seed=5)
    with pytest.raises(PipelineError, match="sha256 .* expected"):
        pretrained.resolve(PretrainedParams((tmp_path / "other.pt").as_uri(), sha.replace(sha[0], "0", 1)
                                            if sha[0] != "0" else "1" + sha[1:], None))
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]  # nothing partial was kept
    first.write_bytes(first.read_bytes()[:-1])  # the cached copy changed on the user's disk
    with pytest.raises(PipelineError, match="cached copy changed"):
        pretrained.resolve(PretrainedParams(url, sha, None))
    assert first.exists()  # reported, never replaced


def test_pretrained_errors_name_the_file(tmp_path):
    with pytest.raises(PipelineError, match="missing.pt: file not found"):
        pretrained.resolve(PretrainedParams(str(tmp_path / "missing.pt"), None, None))
    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "odd.pt")
    with pytest.raises(PipelineError, match="odd.pt: none of its 1 tensors matches"):
        pretrained.load(build_model(config("resnet50")), PretrainedParams(str(tmp_path / "odd.pt"), None, None))
    (tmp_path / "text.pt").write_text("not weights")
    with pytest.raises(PipelineError, match="text.pt: not a PyTorch weights file"):
        pretrained.load(build_model(config("resnet50")), PretrainedParams(str(tmp_path / "text.pt"), None, None))
    with pytest.raises(PipelineError, match="sha256.*required for a URL"):
        tiny_params(tmp_path, **{"train.pretrained.weights": "https://example.org/w.pt"})


# --- one MONAI network through every stage --------------------------------------------------

@pytest.fixture(scope="module")
def densenet_run(tmp_path_factory):
    """The tiny phantom with DenseNet-121, started from another DenseNet's weights, through every stage."""
    root = tmp_path_factory.mktemp("densenet_run")
    _, sha = weights_file(root / "start.pt", classes=2)
    params = tiny_params(root, **{"train.model": "densenet121", "train.epochs": 1, "data.phantom.n_train": 80,
                                  "data.phantom.n_val": 40, "data.phantom.n_test": 40, "train.pretrained.weights":
                                  str(root / "start.pt"), "train.pretrained.sha256": sha,
                                  "train.pretrained.source": "a DenseNet of this test", "explain.methods":
                                  ["grad_cam", "guided_grad_cam"]})
    run_stages(root, params, STAGES_TO_REPORT)
    return root, params, sha


@pytest.mark.slow
def test_densenet_runs_every_stage_from_pretrained_weights(densenet_run, tmp_path):
    root, _, sha = densenet_run
    train = json.loads((root / "reports/train/metrics.json").read_text())["train"]
    assert train["pretrained"]["sha256"] == sha and train["pretrained"]["loaded"] == train["pretrained"]["tensors"]
    assert torch.load(root / "models/network.pt", weights_only=True)["pretrained"]["sha256"] == sha
    explained = json.loads((root / "reports/explain/metrics.json").read_text())
    assert {"grad_cam", "guided_grad_cam"} <= set(json.dumps(explained).replace('"', " ").split())
    html = (root / "reports/report.html").read_text()
    assert "densenet121 (MONAI)" in html and sha in html and "pretrained on a DenseNet of this test" in html
    card = (root / "reports/model_card.md").read_text()
    assert f"densenet121 CNN started from pretrained weights start.pt (sha256 {sha})" in card
    images = load_split(root / "data/prepared", "test")["images"][:6]
    np.savez(tmp_path / "new.npz", test_images=images)
    counts = predict.run(tmp_path / "new.npz", tmp_path / "out.csv", root / "models/model.pt")
    assert counts["error"] == 0 and counts["ok"] + counts["warning"] == 6


def test_explain_splits_its_passes_to_the_activation_budget_and_gives_the_same_maps(monkeypatch, tmp_path):
    """Every method that runs copies of the images (SmoothGrad, Integrated Gradients, occlusion,
    LIME) and Captum's infidelity and sensitivity give the same values whether the copies go
    through the network in one pass or in passes of a few: what bounds explain's memory on big
    networks (DenseNet-121 at 128 px: occlusion under the sensitivity check held 9.5 GB)."""
    from pipeline.xai import attributions, trust

    torch.manual_seed(0)
    model = build_model(config("monai_resnet18", classes=2)).eval()
    cfg = tiny_params(tmp_path, **{"explain.smoothgrad_samples": 4, "explain.ig_steps": 4, "explain.lime_samples": 12,
                                   "explain.lime_grid": 4, "explain.occlusion_window": 0.25}).explain
    x, t = torch.rand(3, 1, 28, 28), torch.tensor([0, 1, 1])
    methods = ("smoothgrad", "integrated_gradients", "occlusion", "lime", "saliency")

    def everything() -> dict[str, torch.Tensor]:
        found = {m: attributions.explainer(m, model, cfg, (1, 28, 28), 0)(x.clone().requires_grad_(True), t)
                 for m in methods}
        maps = found["saliency"].sum(dim=1).numpy()
        fn = attributions.explainer("saliency", model, cfg, (1, 28, 28), 0)
        scores = trust.captum_scores(model, x, t, maps, fn, seed=0, n_perturb=4)
        return {**found, **{k: torch.tensor(v) for k, v in scores.items()}}
    whole = everything()
    with_gradients, without = attributions.footprint(model, (1, 28, 28))
    assert with_gradients > without > 0 and model.training is False
    monkeypatch.setattr(attributions, "ACTIVATION_BUDGET", with_gradients)  # one copy per gradient pass
    assert attributions.images_per_pass(model, (1, 28, 28)) == 1
    # Fewer copies per pass without gradients than LIME's 12 samples and infidelity's 3 × 4 copies:
    assert 1 < attributions.images_per_pass(model, (1, 28, 28), gradients=False) < 12
    split = everything()
    for name, expected in whole.items():
        torch.testing.assert_close(split[name], expected, atol=1e-5, rtol=1e-4, msg=name)
