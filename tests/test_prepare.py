"""prepare: every source gives validated splits; every bad input gives one clear error and no output."""

import subprocess
import sys

import numpy as np
import pytest

from pipeline import prepare
from pipeline.core.dataset import load_meta, load_split
from pipeline.core.errors import PipelineError
from pipeline.core.files import file_digest, read_json
from tests.conftest import MEDMNIST, REPO, make_npz, tiny_params, write_params


def run_prepare(tmp_path, **overrides):
    params = tiny_params(tmp_path, **overrides)
    return prepare.run(params, tmp_path / "prepared", tmp_path / "summary.json")


def test_phantom_summary_counts_and_checksums(tmp_path):
    summary = run_prepare(tmp_path)
    assert summary["class_names"] == ["normal", "lesion"]
    assert summary["splits"]["train"]["class_counts"] == {"normal": 128, "lesion": 32}
    assert summary["has_masks"] is True
    for name, digest in summary["outputs_sha256"].items():
        assert file_digest(tmp_path / "prepared" / name) == digest
    assert read_json(tmp_path / "summary.json") == summary
    assert load_split(tmp_path / "prepared", "test")["masks"].shape == (80, 32, 32)


@pytest.mark.parametrize(("channels", "classes"), [(None, 2), (3, 5), (1, 7)])
def test_npz_grayscale_rgb_multiclass(tmp_path, channels, classes):
    path = make_npz(tmp_path / "in.npz", classes=classes, channels=channels)
    summary = run_prepare(tmp_path, **{"data.source": "npz", "data.path": str(path)})
    meta = load_meta(tmp_path / "prepared")
    assert meta["num_classes"] == classes and meta["channels"] == (channels or 1)
    assert summary["input"]["sha256"] == file_digest(path)
    train = load_split(tmp_path / "prepared", "train")
    assert train["images"].shape == (40, 8, 8, channels or 1)
    assert sorted(np.unique(train["labels"])) == list(range(classes))


def test_class_names_label_the_classes(tmp_path):
    path = make_npz(tmp_path / "in.npz")
    summary = run_prepare(tmp_path, **{"data.source": "npz", "data.path": str(path), "data.class_names": ["benign", "malignant"]})
    assert summary["splits"]["test"]["class_counts"] == {"benign": 8, "malignant": 8}


BAD_NPZ = {
    "missing key": ({"val_labels": None}, "missing key 'val_labels'"),
    "length mismatch": ({"train_labels": np.zeros((39, 1), np.uint8)}, "train_images has 40 images but train_labels has 39"),
    "negative label": ({"test_labels": np.full((16, 1), -1, np.int64)}, "test labels outside 0..1"),
    "float images": ({"train_images": np.zeros((40, 8, 8), np.float32)}, "expected uint8"),
    "nan images": ({"val_images": np.full((12, 8, 8), np.nan)}, "val_images contains NaN"),
    "nan labels": ({"val_labels": np.full((12, 1), np.nan)}, "val_labels contains NaN"),
    "multi-label": ({"train_labels": np.zeros((40, 3), np.uint8)}, "different numbers of label columns"),
    "one class": ({"train_labels": np.zeros((40, 1), np.uint8), "val_labels": np.zeros((12, 1), np.uint8),
                   "test_labels": np.zeros((16, 1), np.uint8)}, "at least 2 are needed"),
    "bad channels": ({"train_images": np.zeros((40, 8, 8, 2), np.uint8)}, "expected N×H×W, N×H×W×C with C in"),
    "empty split": ({"test_images": np.zeros((0, 8, 8), np.uint8), "test_labels": np.zeros((0, 1), np.uint8)}, "split 'test' is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_NPZ))
def test_bad_npz_is_one_clear_error_and_leaves_outputs_alone(tmp_path, case):
    replace, message = BAD_NPZ[case]
    path = make_npz(tmp_path / "bad.npz", **replace)
    # Outputs of an earlier good run must survive a failed one untouched.
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "keep.txt").write_text("earlier run")
    with pytest.raises(PipelineError) as err:
        run_prepare(tmp_path, **{"data.source": "npz", "data.path": str(path)})
    assert message in str(err.value) and "bad.npz" in str(err.value)
    assert [p.name for p in (tmp_path / "prepared").iterdir()] == ["keep.txt"]
    assert not (tmp_path / "summary.json").exists()
    assert not list(tmp_path.glob(".prepared*"))


def test_label_outside_class_names(tmp_path):
    path = make_npz(tmp_path / "in.npz", classes=3)
    with pytest.raises(PipelineError, match="labels outside 0..1"):
        run_prepare(tmp_path, **{"data.source": "npz", "data.path": str(path), "data.class_names": ["a", "b"]})


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(PipelineError, match="absent.npz: file not found"):
        run_prepare(tmp_path, **{"data.source": "npz", "data.path": str(tmp_path / "absent.npz")})
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(PipelineError, match="junk.npz: not a readable .npz"):
        run_prepare(tmp_path, **{"data.source": "npz", "data.path": str(tmp_path / "junk.npz")})
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(PipelineError, match=r"empty.npz: empty file \(0 bytes\)"):
        run_prepare(tmp_path, **{"data.source": "npz", "data.path": str(tmp_path / "empty.npz")})
    whole = make_npz(tmp_path / "whole.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])  # the zip directory at the end is lost
    with pytest.raises(PipelineError, match="cut.npz: not a readable .npz"):
        run_prepare(tmp_path, **{"data.source": "npz", "data.path": str(tmp_path / "cut.npz")})
    np.savez_compressed(tmp_path / "packed.npz", **dict(np.load(tmp_path / "whole.npz")))
    packed = bytearray((tmp_path / "packed.npz").read_bytes())
    start = packed.index(b"train_images.npy") + 200  # inside that member's compressed data
    packed[start:start + 64] = bytes(64)
    (tmp_path / "corrupt.npz").write_bytes(bytes(packed))
    with pytest.raises(PipelineError, match="corrupt.npz: (train_images cannot be read|not a readable)"):
        run_prepare(tmp_path, **{"data.source": "npz", "data.path": str(tmp_path / "corrupt.npz")})


@pytest.mark.parametrize(("content", "problem"), [(None, "file not found"), (b"", "empty file (0 bytes), not a .npz archive")])
def test_command_line_error_is_one_line_no_traceback(tmp_path, content, problem):
    if content is not None:
        (tmp_path / "absent.npz").write_bytes(content)
    params = write_params(tmp_path / "params.yaml", {"data.source": "npz", "data.path": str(tmp_path / "absent.npz")})
    result = subprocess.run([sys.executable, "-m", "pipeline.prepare", "--params", str(params)], cwd=tmp_path,
                            capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {tmp_path / 'absent.npz'}: {problem}"]
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


def test_unknown_param_on_command_line(tmp_path):
    params = write_params(tmp_path / "params.yaml", {"balance.strategy": "magic"})
    result = subprocess.run([sys.executable, "-m", "pipeline.balance", "--params", str(params)], cwd=tmp_path,
                            capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1 and "'balance.strategy' is 'magic'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(not (MEDMNIST / "breastmnist.npz").exists(), reason="shared MedMNIST data not present")
def test_real_breastmnist(tmp_path):
    summary = run_prepare(tmp_path, **{"data.source": "npz", "data.path": str(MEDMNIST / "breastmnist.npz")})
    assert summary["splits"]["train"]["class_counts"] == {"0": 147, "1": 399}
    assert summary["splits"]["test"]["n"] == 156
    assert summary["input"]["sha256"] == "3a22d2a4625e7dd8903f0f59030e81a3d0c222bece2e5e10927456cb50efdec1"
    assert summary["image_size"] == [28, 28] and summary["channels"] == 1
