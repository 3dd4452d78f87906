"""DP-SGD with Opacus: refusals, the guarantee reported and carried, reproducibility."""

import json
import math

import pytest
import torch

from pipeline.core.errors import PipelineError
from pipeline.modeling import dp_sgd
from tests.conftest import run_train, tiny_params

PRIVATE = {"train.privacy.enabled": True, "train.norm": "group", "train.epochs": 3, "train.patience": 3}


def test_settings_that_void_the_guarantee_are_refused_by_name(tmp_path):
    params = tiny_params(tmp_path, **{**PRIVATE, "train.norm": "batch", "balance.strategy": "smote",
                                      "train.sampler": "weighted", "train.grad_clip": 1.0,
                                      "train.channels_last": True})
    with pytest.raises(PipelineError) as error:
        dp_sgd.check(params)
    for named in ("balance.strategy=smote (repeated or blended", "train.sampler=weighted (the accounting",
                  "train.grad_clip>0 (per-image", "train.norm=batch (batch statistics",
                  "train.channels_last=true (Opacus"):
        assert named in str(error.value)
    dp_sgd.check(tiny_params(tmp_path, **PRIVATE))  # the allowed combination passes
    dp_sgd.check(tiny_params(tmp_path, **{"balance.strategy": "smote"}))  # and nothing is checked without privacy


def test_private_training_spends_at_most_its_budget_and_is_reproducible(balanced):
    metrics = run_train(balanced, "a", **PRIVATE)["train"]
    spent = metrics["privacy"]
    assert 0 < spent["epsilon"] <= 8.0 + 1e-3 and spent["accountant"] == "prv"
    assert spent["delta"] == pytest.approx(1 / (10 * 160)) and spent["max_grad_norm"] == 1.0
    assert spent["noise_multiplier"] > 0 and spent["sample_rate"] == pytest.approx(1 / 5)  # 160 images, batches of 32
    assert 3 * 5 - 3 <= spent["steps"] <= 3 * 5  # Poisson draws: an empty batch releases nothing and is not counted
    assert torch.load(balanced / "a" / "model.pt", weights_only=True)["privacy"] == spent
    run_train(balanced, "b", **PRIVATE)
    assert (balanced / "a" / "model.pt").read_bytes() == (balanced / "b" / "model.pt").read_bytes()
    # A tighter budget needs more noise.
    tight = run_train(balanced, "c", **{**PRIVATE, "train.privacy.target_epsilon": 1.0})["train"]["privacy"]
    assert tight["noise_multiplier"] > spent["noise_multiplier"] and tight["epsilon"] <= 1.0 + 1e-3


def test_secure_mode_without_its_generator_is_one_clear_error(balanced):
    pytest.importorskip("opacus")
    try:
        import torchcsprng  # noqa: F401
        pytest.skip("torchcsprng is installed")
    except ImportError:
        pass
    with pytest.raises(PipelineError, match="secure_mode=true needs the torchcsprng package"):
        run_train(balanced, "s", **{**PRIVATE, "train.privacy.secure_mode": True})
    assert not (balanced / "s" / "model.pt").exists()


@pytest.mark.parametrize("task", ["multilabel", "ordinal"])
def test_private_training_takes_findings_and_grades(tmp_path, task):
    from tests.conftest import run_stages

    params = tiny_params(tmp_path, **{**PRIVATE, "data.phantom.task": task, "train.epochs": 1})
    run_stages(tmp_path, params, ("prepare", "balance", "train"))
    metrics = json.loads((tmp_path / "reports/train/metrics.json").read_text())["train"]
    assert 0 < metrics["privacy"]["epsilon"] <= params.train.privacy.target_epsilon
    assert metrics["epochs_run"] == 1 and math.isfinite(metrics["val_loss"])
