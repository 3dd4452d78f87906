"""The phantom: deterministic, right prevalence, masks only where lesions are, not trivial."""

import numpy as np

from pipeline.data.phantom import generate_split
from tests.conftest import tiny_params


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    cfg = tiny_params(tmp_path).data.phantom
    a, b = generate_split(cfg, 1, "train"), generate_split(cfg, 1, "train")
    c = generate_split(cfg, 2, "train")
    for key in ("images", "labels", "masks"):
        assert a[key].tobytes() == b[key].tobytes()
    assert a["images"].tobytes() != c["images"].tobytes()


def test_shapes_prevalence_and_masks(tmp_path):
    cfg = tiny_params(tmp_path).data.phantom
    data = generate_split(cfg, 0, "val")
    n, size = cfg.n_val, cfg.image_size
    assert data["images"].shape == (n, size, size, 1) and data["images"].dtype == np.uint8
    assert data["labels"].sum() == round(cfg.prevalence * n)
    has_mask = data["masks"].reshape(n, -1).any(axis=1)
    np.testing.assert_array_equal(has_mask, data["labels"] == 1)
    assert len(set(data["ids"])) == n


def test_lesions_are_local_not_global_brightness(tmp_path):
    cfg = tiny_params(tmp_path, **{"data.phantom.n_train": 400}).data.phantom
    data = generate_split(cfg, 0, "train")
    images = data["images"][..., 0].astype(float)
    pos = data["labels"] == 1
    inside = np.mean([img[m > 0].mean() for img, m in zip(images[pos], data["masks"][pos])])
    # The lesion region is brighter than the organ around it...
    assert inside > images[pos].mean() + 20
    # ...but the brightest pixel does not separate the classes: look-alikes are as bright.
    peak = images.reshape(len(images), -1).max(axis=1)
    assert abs(peak[pos].mean() - peak[~pos].mean()) < 25
