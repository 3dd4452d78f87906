"""params.yaml is strict: unknown, missing, mistyped keys and unknown choices fail by name."""

import re
from pathlib import Path

import pytest

from pipeline.core.config import as_dict, flatten, load_params, parse_overrides
from pipeline.core.errors import PipelineError
from tests.conftest import REPO, tiny_params, write_params


def test_repository_params_load():
    params = load_params(REPO / "params.yaml")
    assert params.data.source == "phantom"
    assert params.balance.strategy in ("none", "class_weight", "oversample", "undersample", "smote")
    assert params.data.phantom.lesion_radius[0] <= params.data.phantom.lesion_radius[1]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.lrr": 0.1}, "unknown key 'train.lrr'"),
        ({"balance.strategy": "magic"}, "'balance.strategy' is 'magic'; choose one of"),
        ({"train.epochs": "ten"}, "'train.epochs' must be int"),
        ({"train.lr": -1.0}, "'train.lr' must be positive"),
        ({"train.grad_clip": "fast"}, "'train.grad_clip' is 'fast'; choose one of: auto"),
        ({"train.warmup_epochs": 15}, "'train.warmup_epochs' must be auto or lie in"),
        ({"data.source": "npz", "data.path": None}, "'data.path' must name the input"),
        ({"explain.methods": ["saliency", "deeplift"]}, "'explain.methods[1]' is 'deeplift'; choose one of: saliency,"),
        ({"data.phantom.lesion_radius": [3.0]}, "'data.phantom.lesion_radius' must be a list of 2 values"),
        ({"train.epochs": True}, "'train.epochs' must be int"),
        ({"data.source": "medmnist", "data.name": "mnist"}, "'data.name' is 'mnist'"),
        ({"data.source": "medmnist", "data.name": None}, "'data.name' must name the dataset"),
        ({"evaluate.threshold": "fixed:2"}, "needs a value strictly between 0 and 1"),
        ({"evaluate.baselines": ["knn"]}, "'evaluate.baselines[0]' is 'knn'"),
        ({"data.source": "medmnist", "data.name": "breastmnist", "data.size": 32}, "'data.size' is 32; choose one of: 28, 64, 128, 224"),
        ({"data.split": {"val": 0.5, "test": 0.6}}, "'data.split' needs"),
        ({"data.duplicates": "ignore"}, "'data.duplicates' is 'ignore'"),
        ({"data.channels": 2}, "'data.channels' is 2; choose one of: 1, 3"),
    ],
)
def test_bad_params_name_the_key(tmp_path: Path, overrides, message):
    path = write_params(tmp_path / "params.yaml", overrides)
    with pytest.raises(PipelineError) as err:
        load_params(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_missing_key_and_missing_file(tmp_path: Path):
    text = re.sub(r"(?m)^  patience: .*$", "", (REPO / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(PipelineError, match="missing key 'train.patience'"):
        load_params(tmp_path / "params.yaml")
    with pytest.raises(PipelineError, match="params file not found"):
        load_params(tmp_path / "absent.yaml")


def test_flatten_gives_dotted_names():
    flat = flatten(as_dict(load_params(REPO / "params.yaml")))
    assert flat["train.lr"] == load_params(REPO / "params.yaml").train.lr
    assert flat["data.phantom.ndim"] == 2 and flat["data.phantom.image_size"] is None
    assert isinstance(flat["explain.methods"], list)


def test_overrides_parse_like_dvc_set_params():
    assert parse_overrides(["train.lr=0.01", "evaluate.baselines=[]", "data.path=a=b.npz", "data.name=null"]) == {
        "train.lr": 0.01, "evaluate.baselines": [], "data.path": "a=b.npz", "data.name": None}
    with pytest.raises(PipelineError, match="expected key=value"):
        parse_overrides(["train.lr"])


def test_auto_recipe_follows_the_norm_and_privacy(tmp_path):
    """train.warmup_epochs and train.grad_clip: auto resolve per norm (the recipe measured on
    validation by bench/norms.py); batch norm keeps the project's recipe, DP-SGD clips per image."""
    from pipeline.core.config import effective_train
    from pipeline.modeling import dp_sgd

    batch = tiny_params(tmp_path).train
    assert (batch.warmup_epochs, batch.grad_clip) == ("auto", "auto")
    ran = effective_train(batch, None)
    assert (ran.warmup_epochs, ran.grad_clip, ran.lr) == (0, 0.0, batch.lr)
    group = effective_train(tiny_params(tmp_path, **{"train.norm": "group"}).train, None)
    assert (group.warmup_epochs, group.grad_clip) == (1, 1.0)  # 2 warm-up epochs, at most epochs - 1 (tiny: 2 epochs)
    private = tiny_params(tmp_path, **{"train.norm": "group", "train.privacy.enabled": True})
    assert effective_train(private.train, None).grad_clip == 0.0 and not dp_sgd.refusals(private)
    explicit = effective_train(tiny_params(tmp_path, **{"train.norm": "group", "train.grad_clip": 0.5,
                                                        "train.warmup_epochs": 0}).train, None)
    assert (explicit.grad_clip, explicit.warmup_epochs) == (0.5, 0)
    clipped = tiny_params(tmp_path, **{"train.norm": "group", "train.grad_clip": 0.5, "train.privacy.enabled": True})
    assert "train.grad_clip>0" in dp_sgd.refusals(clipped)[0]
