"""The ONNX export: the package's answers from onnxruntime, its facts in the metadata, refused when they differ."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from pipeline import export, predict
from pipeline.core.dataset import load_split
from pipeline.core.errors import PipelineError
from pipeline.data.privacy import SALT_ENV
from pipeline.modeling.package import load_package

onnxruntime = pytest.importorskip("onnxruntime")


def session_answers(path, images):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images})


def test_onnx_model_answers_as_predict_does(tiny_run, tmp_path, monkeypatch):
    root, _ = tiny_run
    found = export.run(root / "models/model.pt", tmp_path / "model.onnx", prepared=root / "data/prepared")
    assert found["images"] == 80 and found["max_abs_difference"] <= export.TOLERANCE and found["decisions_equal"]
    images = np.asarray(load_split(root / "data/prepared", "test")["images"][:12])
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0]).save(tmp_path / f"{i:03d}.png")
    monkeypatch.setenv(SALT_ENV, "s")
    (tmp_path / "scans").mkdir()
    for png in tmp_path.glob("*.png"):
        png.rename(tmp_path / "scans" / png.name)
    predict.run(tmp_path / "scans", tmp_path / "predict.csv", root / "models/model.pt")
    with open(tmp_path / "predict.csv") as handle:
        rows = list(csv.DictReader(handle))
    probs, decisions = session_answers(tmp_path / "model.onnx", images)
    expected = np.array([[float(r["prob_normal"]), float(r["prob_lesion"])] for r in rows])
    np.testing.assert_allclose(probs, expected, atol=1e-5)  # predict writes 6 decimals
    assert [["normal", "lesion"][d] for d in decisions] == [r["prediction"] for r in rows]
    assert probs.dtype == np.float32 and decisions.dtype == np.int64


def test_metadata_carries_the_packages_facts(tiny_run, tmp_path):
    import onnx

    root, _ = tiny_run
    export.run(root / "models/model.pt", tmp_path / "model.onnx", prepared=root / "data/prepared")
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    package = load_package(root / "models/model.pt")
    assert json.loads(meta["medcnn.class_names"]) == package.class_names
    assert json.loads(meta["medcnn.threshold"]) == package.threshold
    assert float(meta["medcnn.temperature"]) == package.temperature
    assert json.loads(meta["medcnn.input_shape"]) == [32, 32, 1] and len(meta["medcnn.package_sha256"]) == 64


def test_multi_class_rgb_model_decides_by_argmax(rgb_run, tmp_path):
    root, _ = rgb_run
    export.run(root / "models/model.pt", tmp_path / "rgb.onnx", prepared=root / "data/prepared")
    images = np.asarray(load_split(root / "data/prepared", "test")["images"])
    probs, decisions = session_answers(tmp_path / "rgb.onnx", images)
    assert probs.shape == (len(images), 5) and np.array_equal(decisions, probs.argmax(axis=1))


def test_an_export_that_disagrees_is_refused_and_not_written(tiny_run, tmp_path, monkeypatch):
    root, _ = tiny_run
    forward = export.Deployable.forward
    monkeypatch.setattr(export.Deployable, "forward", lambda self, x: (forward(self, x)[0] * 0.99, forward(self, x)[1]))
    with pytest.raises(PipelineError, match="not written: onnxruntime differs from the model package"):
        export.run(root / "models/model.pt", tmp_path / "model.onnx", prepared=root / "data/prepared")
    assert not (tmp_path / "model.onnx").exists()
