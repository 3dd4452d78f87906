"""Networks: shapes for 1/3 channels and 2/5/7 classes, the seed design exactly, checkpoints."""

import pytest
import torch
from torch import nn

from pipeline.modeling.checkpoints import load_checkpoint, save_checkpoint
from pipeline.modeling.networks import ModelConfig, build_model, folded


def config(name="small_cnn", channels=1, classes=2, size=28, width=4):
    return ModelConfig(name=name, in_channels=channels, num_classes=classes, image_size=size, width=width, mean=0.4, std=0.2)


@pytest.mark.parametrize("name", ["seed_cnn", "small_cnn", "resnet18"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("classes", [2, 5, 7])
def test_forward_and_one_training_step(name, channels, classes):
    torch.manual_seed(0)
    model = build_model(config(name, channels, classes))
    x = torch.rand(4, channels, 28, 28)
    logits = model(x)
    assert logits.shape == (4, classes)
    loss = nn.functional.cross_entropy(logits, torch.arange(4) % classes)
    loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_seed_network_is_the_seed_design():
    net = build_model(config("seed_cnn", 1, 2, 28)).net
    layers = [m for m in net.modules() if not isinstance(m, (nn.Sequential, type(net)))]
    kinds = [type(m).__name__ for m in layers]
    assert kinds == ["Conv2d", "ReLU", "MaxPool2d", "Flatten", "Linear", "ReLU", "Linear"]
    conv, linear1, linear2 = layers[0], layers[4], layers[6]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (1, 16, (3, 3), (1, 1))
    assert (linear1.in_features, linear1.out_features) == (16 * 14 * 14, 128)
    assert (linear2.in_features, linear2.out_features) == (128, 2)


@pytest.mark.parametrize("name", ["seed_cnn", "small_cnn", "resnet18"])
def test_no_inplace_relu_for_captum(name):
    model = build_model(config(name))
    assert all(not m.inplace for m in model.modules() if isinstance(m, nn.ReLU))


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    torch.manual_seed(0)
    model = build_model(config("small_cnn", 3, 5)).eval()
    save_checkpoint(tmp_path / "m.pt", model, {"class_names": list("abcde"), "best_epoch": 3})
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["config"]["num_classes"] == 5 and raw["best_epoch"] == 3
    loaded, extra = load_checkpoint(tmp_path / "m.pt")
    x = torch.rand(2, 3, 28, 28)
    torch.testing.assert_close(loaded(x), model(x))
    assert extra["class_names"] == list("abcde")


def test_checkpoint_bytes_do_not_depend_on_file_name(tmp_path):
    torch.manual_seed(0)
    model = build_model(config())
    save_checkpoint(tmp_path / "a.pt", model, {})
    save_checkpoint(tmp_path / "b.pt", model, {})
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


@pytest.mark.parametrize(("size", "stem_stride"), [(28, 1), (64, 1), (128, 4)])
def test_resnet_is_resnet18_shaped_for_28_to_224_px(size, stem_stride):
    model = build_model(config("resnet18", 1, 2, size, width=8)).net
    blocks = [m for m in model.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 8  # 2-2-2-2, as ResNet-18
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert len(convs) == 17  # the stem + 16 in the blocks: 18 weighted layers with the classifier
    with torch.no_grad():
        maps = model.features(torch.rand(1, 1, size, size))
    assert maps.shape[2] == -(-size // (stem_stride * 8))  # three stride-2 stages, rounding up


@pytest.mark.parametrize("name,ndim", [("small_cnn", 2), ("resnet18", 2), ("small_cnn", 3)])
def test_folded_inference_copy_matches_and_leaves_the_model_alone(name, ndim):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, in_channels=1, num_classes=3, image_size=16, width=4, mean=0.4,
                                    std=0.2, ndim=ndim))
    x = torch.rand(6, 1, *[16] * ndim)
    model.train()
    for _ in range(3):  # running statistics away from their initial values
        model(x * 2 + 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inference = folded(model)
    norms = [m for m in inference.modules() if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d))]
    assert norms == []
    with torch.no_grad():
        assert torch.allclose(inference(x), model.eval()(x), atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)) for m in model.modules())
    assert type(inference.cam_layer) is type(model.cam_layer)
