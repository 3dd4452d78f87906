"""The membership inference audit: its statistics, and real models that do and do not leak."""

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.evaluation import membership
from pipeline.modeling import dp_sgd
from tests.conftest import tiny_params


def probs_of(confidence: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Two-class probabilities giving the true class ``confidence``."""
    probs = np.empty((len(labels), 2))
    probs[np.arange(len(labels)), labels] = confidence
    probs[np.arange(len(labels)), 1 - labels] = 1 - confidence
    return probs


def test_statistics_on_known_distributions():
    rng = np.random.default_rng(0)
    labels = np.arange(2000) % 2
    same = lambda: probs_of(rng.uniform(0.05, 0.95, 2000), labels)
    blind = membership.audit((same(), labels), (same(), labels), (same(), labels), 1e-5, 200, 0)
    for attack in blind["attacks"].values():
        assert attack["roc_auc_ci_low"] < 0.5 < attack["roc_auc_ci_high"]
        assert attack["empirical_epsilon"] < 0.5
    leaky = membership.audit((probs_of(rng.uniform(0.9, 1.0, 2000), labels), labels), (same(), labels),
                             (same(), labels), 1e-5, 200, 0)
    assert leaky["attacks"]["loss"]["roc_auc"] > 0.9 and leaky["attacks"]["loss"]["tpr_at_1pct_fpr"] > 0.05
    assert leaky["attacks"]["loss"]["empirical_epsilon"] > 1.0
    assert leaky["members"] == leaky["non_members"] == 2000


def test_rates_need_enough_non_members_and_bounds_hold():
    member = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    score = np.r_[np.arange(50) + 25.0, np.arange(50.0)]
    assert membership.tpr_at_fpr(member, score, 0.01) is None  # 50 non-members cannot resolve 1%
    member = np.r_[np.ones(200, bool), np.zeros(200, bool)]
    score = np.r_[np.arange(200) + 100.0, np.arange(200.0)]
    # 1% of 200 outsiders may pass: the threshold is the 3rd-highest outsider (197); members 198..299 pass
    assert membership.tpr_at_fpr(member, score, 0.01) == pytest.approx(102 / 200)
    low, high = membership.clopper_pearson(0, 100, 0.95)
    assert low == 0 and 0.03 < high < 0.04  # rule of three
    assert membership.epsilon_bound(100, 100, 0, 100, 1e-5) > membership.epsilon_bound(60, 100, 40, 100, 1e-5) == 0


def test_calibration_removes_class_difficulty():
    # Class 1 is much harder than class 0, and it is where training left its trace (members 3 sd
    # more confident; class 0 barely). A global loss threshold only ever passes easy class-0
    # images; calibrated per class, the hard class's members stand out.
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(500, int), np.ones(500, int)]
    base = np.where(labels == 0, 0.95, 0.6)
    members = probs_of(np.clip(base + np.where(labels == 0, 0.005, 0.06) + rng.normal(0, 0.02, 1000), 0.01, 0.999),
                       labels)
    others = probs_of(np.clip(base + rng.normal(0, 0.02, 1000), 0.01, 0.999), labels)
    reference = probs_of(np.clip(base + rng.normal(0, 0.02, 1000), 0.01, 0.999), labels)
    attacks = membership.audit((members, labels), (others, labels), (reference, labels), 1e-5, 200, 0)["attacks"]
    assert attacks["calibrated"]["tpr_at_1pct_fpr"] > attacks["loss"]["tpr_at_1pct_fpr"] + 0.1


def random_label_task() -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """600 noise vectors with random labels (only memorising fits them); the first 200 train."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(600, 64)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 2, 600))
    return x, y, nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 2))


def attack(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Members: the 200 training vectors; non-members the next 200; the last 200 the reference."""
    with torch.no_grad():
        probs = torch.softmax(net(x), 1).double().numpy()
    labels = y.numpy()
    return membership.audit((probs[:200], labels[:200]), (probs[200:400], labels[200:400]),
                            (probs[400:], labels[400:]), 1e-5, 200, 0)["attacks"]


def test_a_memorising_network_leaks_and_an_untrained_one_does_not():
    x, y, net = random_label_task()
    untrained = attack(net, x, y)
    assert untrained["loss"]["roc_auc_ci_low"] < 0.5 < untrained["loss"]["roc_auc_ci_high"]
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x[:200]), y[:200]).backward()
        optimizer.step()
    memorised = attack(net, x, y)
    assert memorised["loss"]["roc_auc"] > 0.9 and memorised["loss"]["roc_auc_ci_low"] > 0.8


def test_dp_sgd_leaks_less_than_the_same_training_without_it(tmp_path):
    """The same network, data, optimiser and number of steps, through the pipeline's DP-SGD wrapper or not."""
    params = tiny_params(tmp_path, **{"train.epochs": 40, "train.batch_size": 50, "train.norm": "group",
                                      "train.privacy.enabled": True, "train.privacy.target_epsilon": 1.0})
    audits = {}
    for private in (False, True):
        x, y, net = random_label_task()
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
        generator = torch.Generator().manual_seed(0)
        dp = dp_sgd.make_private(params, net, optimizer, 200, generator) if private else None
        model, step = (dp.model, dp.optimizer) if dp else (net, optimizer)
        for _ in range(40):
            batches = dp.batches() if dp else (torch.randperm(200, generator=generator)[i:i + 50] for i in range(0, 200, 50))
            for batch in batches:
                if len(batch):
                    step.zero_grad()
                    nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
                    step.step()
        if dp:
            assert dp.guarantee()["epsilon"] <= 1.0 + 1e-3
            dp.release()
        audits[private] = attack(net, x, y)["loss"]
    assert audits[False]["roc_auc"] > 0.9
    assert audits[True]["roc_auc"] < 0.65 and audits[True]["roc_auc_ci_low"] < 0.5 + 0.05
