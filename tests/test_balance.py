"""balance: each strategy gives the expected class mix, on the training split only."""

import numpy as np
import pytest

from pipeline import balance
from pipeline.core.files import load_npy, read_json
from tests.conftest import tiny_params


def run_balance(root, strategy):
    params = tiny_params(root, **{"balance.strategy": strategy})
    report = balance.run(params, root / "prepared", root / "balanced", root / "balance.json")
    return report, {n: load_npy(root / "balanced" / f"{n}.npy") for n in ("indices", "synthetic_images", "synthetic_labels")}


@pytest.mark.parametrize(("strategy", "after", "synthetic"), [
    ("none", {"normal": 128, "lesion": 32}, 0),
    ("class_weight", {"normal": 128, "lesion": 32}, 0),
    ("oversample", {"normal": 128, "lesion": 128}, 0),
    ("undersample", {"normal": 32, "lesion": 32}, 0),
    ("smote", {"normal": 128, "lesion": 128}, 96),
])
def test_strategy_counts(prepared, strategy, after, synthetic):
    report, out = run_balance(prepared, strategy)
    assert report["before"] == {"normal": 128, "lesion": 32}
    assert report["after"] == after
    assert report["synthetic_images"] == synthetic == len(out["synthetic_labels"])
    assert out["indices"].min() >= 0 and out["indices"].max() < 160
    assert out["synthetic_images"].dtype == np.uint8
    assert out["synthetic_images"].shape[1:] == (32, 32, 1)
    assert read_json(prepared / "balance.json") == report


def test_class_weights_are_balanced_formula(prepared):
    report, _ = run_balance(prepared, "class_weight")
    assert report["class_weights"] == {"normal": pytest.approx(160 / (2 * 128)), "lesion": pytest.approx(160 / (2 * 32))}
    report, _ = run_balance(prepared, "oversample")
    assert report["class_weights"] == {"normal": 1.0, "lesion": 1.0}


def test_undersample_keeps_every_minority_image_once(prepared):
    _, out = run_balance(prepared, "undersample")
    labels = load_npy(prepared / "prepared" / "train" / "labels.npy")
    chosen = out["indices"]
    assert len(set(chosen.tolist())) == len(chosen)
    assert set(chosen[labels[chosen] == 1].tolist()) == set(np.flatnonzero(labels == 1).tolist())


def test_smote_synthetic_images_are_new_and_of_the_minority(prepared):
    _, out = run_balance(prepared, "smote")
    assert set(out["synthetic_labels"].tolist()) == {1}
    train = load_npy(prepared / "prepared" / "train" / "images.npy")
    originals = {img.tobytes() for img in train}
    assert sum(img.tobytes() in originals for img in out["synthetic_images"]) < 5


def test_same_seed_same_resampling(prepared):
    _, first = run_balance(prepared, "oversample")
    _, second = run_balance(prepared, "oversample")
    np.testing.assert_array_equal(first["indices"], second["indices"])
