"""Losses, sampling, schedules and augmentation: expected class mix, values, determinism."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.evaluate import imbalanced_report
from pipeline.modeling.recipe import FocalLoss, WeightAverage, augment, epoch_order, lr_factor, make_loss
from tests.conftest import first_epoch_loss, run_train


def cfg(params, **changes):
    return dataclasses.replace(params.train, **changes)


def test_weighted_sampler_balances_classes_and_is_seeded():
    labels = torch.tensor([0] * 900 + [1] * 100)
    order = epoch_order(labels, "weighted", torch.Generator().manual_seed(0))
    assert len(order) == 1000
    share = labels[order].float().mean().item()
    assert 0.45 < share < 0.55  # 10% minority drawn about half the time
    again = epoch_order(labels, "weighted", torch.Generator().manual_seed(0))
    assert torch.equal(order, again)
    plain = epoch_order(labels, "none", torch.Generator().manual_seed(0))
    assert sorted(plain.tolist()) == list(range(1000))


def test_focal_loss_reduces_to_cross_entropy_and_downweights_easy_examples():
    torch.manual_seed(0)
    logits, target = torch.randn(64, 3), torch.randint(0, 3, (64,))
    weight = torch.tensor([1.0, 2.0, 0.5])
    ce = nn.functional.cross_entropy(logits, target, weight=weight)
    per_image = FocalLoss(0.0, weight)(logits, target)  # weighted, per image: sum / total weight is the mean
    torch.testing.assert_close(per_image.sum() / weight[target].sum(), ce)
    easy = torch.tensor([[6.0, 0.0, 0.0]])
    hard = torch.tensor([[0.0, 0.5, 0.0]])
    zero, ones = torch.tensor([0]), torch.ones(3)
    ratio_easy = FocalLoss(2.0, ones)(easy, zero)[0] / nn.functional.cross_entropy(easy, zero)
    ratio_hard = FocalLoss(2.0, ones)(hard, zero)[0] / nn.functional.cross_entropy(hard, zero)
    assert ratio_easy < 0.01 < 0.3 < ratio_hard


def test_a_batch_shared_between_workers_gives_the_one_process_loss(params):
    """Each worker's weighted sum over the batch's total weight, times the workers, averaged (as DDP
    averages gradients), is the weighted mean loss of the whole batch."""
    from pipeline.modeling.distributed import World

    torch.manual_seed(1)
    logits, target = torch.randn(10, 2), torch.randint(0, 2, (10,))
    weight = torch.tensor([0.6, 3.0])
    loss_fn = make_loss(cfg(params, loss="cross_entropy", label_smoothing=0.1), weight)
    whole = nn.functional.cross_entropy(logits, target, weight=weight, label_smoothing=0.1)
    batch = np.arange(10)
    shared = []
    for rank in range(3):
        _, rows = World(rank, 3).share(batch)
        shared.append(loss_fn(logits[rows], target[rows]).sum() * 3 / weight[target].sum())
    torch.testing.assert_close(sum(shared) / 3, whole)
    assert [len(World(r, 3).share(batch)[0]) for r in range(3)] == [3, 4, 3]


def test_make_loss_follows_params(params):
    weight = torch.tensor([1.0, 3.0])
    assert isinstance(make_loss(cfg(params, loss="focal"), weight), FocalLoss)
    loss = make_loss(cfg(params, loss="cross_entropy", label_smoothing=0.1), weight)
    assert isinstance(loss, nn.CrossEntropyLoss) and loss.label_smoothing == 0.1 and loss.reduction == "none"


def test_learning_rate_schedules(params):
    warm = cfg(params, epochs=10, warmup_epochs=2, schedule="cosine")
    assert lr_factor(warm, 0, 100) == pytest.approx(1 / 20)
    assert lr_factor(warm, 19, 100) == pytest.approx(1.0)
    assert lr_factor(warm, 99, 100) < 0.01
    assert lr_factor(cfg(params, epochs=10, warmup_epochs=0, schedule="onecycle"), 100, 100) == pytest.approx(0.01)
    assert lr_factor(cfg(params, epochs=10, warmup_epochs=0, schedule="none"), 57, 100) == 1.0


def test_augmentation_is_seeded_bounded_and_off_when_zero(params):
    x = torch.rand(8, 1, 16, 16)
    off = cfg(params, aug_rotate=0.0, aug_translate=0.0, aug_scale=0.0, aug_intensity=0.0, aug_flip=False)
    assert torch.equal(augment(x, off, torch.Generator().manual_seed(0)), x)
    on = cfg(params, aug_rotate=15.0, aug_translate=0.1, aug_scale=0.1, aug_intensity=0.2, aug_flip=True)
    a = augment(x, on, torch.Generator().manual_seed(1))
    b = augment(x, on, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, x)
    assert a.min() >= 0 and a.max() <= 1


def test_pure_translation_moves_the_image(params):
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 8, 8] = 1.0
    shift = cfg(params, aug_translate=0.25)
    moved = augment(x, shift, torch.Generator().manual_seed(3))
    assert moved.sum() > 0.5 and torch.argmax(moved) != torch.argmax(x)


@pytest.mark.parametrize("changes", [
    {"train.sampler": "weighted"},
    {"train.loss": "focal", "train.label_smoothing": 0.05, "train.ema": 0.9},
    {"train.schedule": "onecycle", "train.warmup_epochs": 1, "train.grad_clip": 1.0,
     "train.aug_rotate": 10.0, "train.aug_translate": 0.05, "train.aug_intensity": 0.1},
])
def test_training_options_run_and_stay_deterministic(balanced, changes):  # noqa: F811
    run_train(balanced, "a", **changes)
    run_train(balanced, "b", **changes)
    assert (balanced / "a" / "model.pt").read_bytes() == (balanced / "b" / "model.pt").read_bytes()


def test_channels_last_training_is_deterministic_close_to_nchw_and_saves_nchw(balanced):
    nchw = run_train(balanced, "nchw")
    nhwc = run_train(balanced, "nhwc", **{"train.channels_last": True})
    run_train(balanced, "again", **{"train.channels_last": True})
    assert (balanced / "nhwc" / "model.pt").read_bytes() == (balanced / "again" / "model.pt").read_bytes()
    state = torch.load(balanced / "nhwc" / "model.pt", weights_only=True)["state_dict"]
    assert all(t.is_contiguous() for t in state.values())  # the layout is training's business only
    # The same arithmetic in another summation order: the first epoch's loss agrees closely.
    nhwc_loss = first_epoch_loss(balanced / "nhwc" / "history.csv")
    assert nhwc_loss == pytest.approx(first_epoch_loss(balanced / "nchw" / "history.csv"), rel=1e-3)
    assert abs(nhwc["train"]["val_roc_auc"] - nchw["train"]["val_roc_auc"]) <= 0.05


def test_weight_average_follows_the_warmed_up_decay():
    model = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    average = WeightAverage(model, decay=0.9)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[1].num_batches_tracked += 5
    average.update(model)  # first update: decay min(0.9, 2/11)
    d = 2 / 11
    expected = d * start["0.weight"] + (1 - d) * model[0].weight.detach()
    assert torch.allclose(average.model[0].weight, expected)
    assert average.model[1].num_batches_tracked == 5  # integer buffers are copied, not averaged
    for _ in range(200):
        average.update(model)  # a constant model: the average converges to it
    assert torch.allclose(average.model[0].weight, model[0].weight, atol=1e-6)
    assert not any(p.requires_grad for p in average.model.parameters())
    restored = WeightAverage(model, decay=0.9)
    restored.load_state_dict(average.state_dict())
    assert restored.updates == 201 and torch.equal(restored.model[0].weight, average.model[0].weight)


def test_imbalanced_report_matches_imblearn_names_and_recall():
    labels = np.array([0, 0, 0, 0, 1, 1])
    preds = np.array([0, 0, 0, 1, 1, 0])
    report = imbalanced_report(labels, preds, ["normal", "lesion"])
    assert set(report) == {"normal", "lesion"}
    assert report["normal"]["rec"] == pytest.approx(0.75) and report["lesion"]["rec"] == pytest.approx(0.5)
    assert report["lesion"]["spe"] == pytest.approx(0.75) and report["lesion"]["sup"] == 2
