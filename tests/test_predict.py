"""Using the model: the package, pipeline.predict on every input kind, bad inputs, the out-of-distribution flag."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import predict
from pipeline.core.dataset import load_split
from pipeline.core.errors import PipelineError
from pipeline.data.privacy import SALT_ENV
from pipeline.modeling.package import FORMAT, OOD_WARNING, load_package
from tests.conftest import REPO


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def probabilities(rows: list[dict[str, str]], names: list[str]) -> np.ndarray:
    return np.array([[float(r[f"prob_{n}"]) for n in names] for r in rows])


def export_pngs(images: np.ndarray, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(folder / f"{i:05d}.png")
    return folder


@pytest.fixture(scope="module")
def test_split(tiny_run):
    return load_split(tiny_run[0] / "data/prepared", "test")


@pytest.fixture(autouse=True)
def salt(monkeypatch):
    """The data owner's secret, which predict needs to hash file paths into ids."""
    monkeypatch.setenv(SALT_ENV, "test-salt")


def test_package_holds_everything_and_loads_weights_only(tiny_run):
    root, params = tiny_run
    state = torch.load(root / "models/model.pt", weights_only=True)
    assert state["format"] == FORMAT and state["class_names"] == ["normal", "lesion"]
    assert state["positive_class"] == params.evaluate.positive_class
    assert state["preprocessing"]["input_size"] == [32, 32] and state["preprocessing"]["input_channels"] == 1
    assert {"image_size", "channels", "resize", "dicom"} <= set(state["preprocessing"])
    assert set(state["intensity"]["ranges"]) == {"mean", "std", "histogram_distance"}
    assert len(state["provenance"]["data_sha256"]) == len(state["provenance"]["network_sha256"]) == 64
    metrics = json.loads((root / "reports/eval/metrics.json").read_text())
    assert state["temperature"] == metrics["calibration"]["temperature"]
    assert state["threshold"] == metrics["test"]["threshold"]
    with pytest.raises(PipelineError, match="not a medcnn model package"):
        load_package(root / "models/network.pt")


def test_predict_on_exported_pngs_equals_evaluate(tiny_run, test_split, tmp_path):
    root, _ = tiny_run
    folder = export_pngs(test_split["images"], tmp_path / "pngs")
    counts = predict.run(folder, tmp_path / "out.csv", root / "models/model.pt")
    assert counts["error"] == 0 and counts["ok"] + counts["warning"] == len(test_split["labels"])
    names = ["normal", "lesion"]
    ours, evaluated = read_rows(tmp_path / "out.csv"), read_rows(root / "reports/eval/predictions.csv")
    np.testing.assert_allclose(probabilities(ours, names), probabilities(evaluated, names), atol=1e-5)
    assert [r["prediction"] for r in ours] == [r["prediction"] for r in evaluated]
    assert all(r["id"].startswith("img-") and "000" not in r["id"] for r in ours)  # pseudonyms, not file names
    predict.run(folder, tmp_path / "workers.csv", root / "models/model.pt", workers=2)  # decoded in 2 processes
    assert (tmp_path / "workers.csv").read_bytes() == (tmp_path / "out.csv").read_bytes()


def test_predict_reads_npz_manifest_file_and_dicom(tiny_run, test_split, tmp_path):
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    root, _ = tiny_run
    model = root / "models/model.pt"
    images = test_split["images"][:6]
    reference = load_package(model).score(images).probabilities

    np.savez(tmp_path / "new.npz", test_images=images[..., 0])
    predict.run(tmp_path / "new.npz", tmp_path / "npz.csv", model)
    rows = read_rows(tmp_path / "npz.csv")
    assert [r["id"] for r in rows] == [f"test-{i:06d}" for i in range(6)]
    np.testing.assert_allclose(probabilities(rows, ["normal", "lesion"]), reference, atol=1e-6)

    export_pngs(images, tmp_path / "study" / "scans")
    (tmp_path / "study" / "manifest.csv").write_text("path,site\n" + "".join(f"scans/{i:05d}.png,a\n" for i in range(6))
                                                      + "scans/absent.png,a\n../outside.png,b\n")
    predict.run(tmp_path / "study" / "manifest.csv", tmp_path / "csv.csv", model)
    rows = read_rows(tmp_path / "csv.csv")
    np.testing.assert_allclose(probabilities(rows[:6], ["normal", "lesion"]), reference, atol=1e-6)
    assert [r["status"] for r in rows[6:]] == ["error: file does not exist", "error: path leaves the manifest's folder"]

    predict.run(tmp_path / "study" / "scans" / "00002.png", tmp_path / "one.csv", model)
    np.testing.assert_allclose(probabilities(read_rows(tmp_path / "one.csv"), ["normal", "lesion"]), reference[2:3],
                               atol=1e-6)

    # A DICOM with a window that maps 0..255 onto itself (LINEAR, centre 128, width 256).
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = pydicom.uid.SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("scan.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality, ds.PatientID, ds.PatientName = "CT", "MRN-1234", "Doe^Jane"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 32, 32, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.WindowCenter, ds.WindowWidth = 128, 256
    ds.PixelData = images[3][..., 0].tobytes()
    (tmp_path / "dicom").mkdir()
    ds.save_as(tmp_path / "dicom" / "scan.dcm", enforce_file_format=True)
    predict.run(tmp_path / "dicom", tmp_path / "dicom.csv", model)
    rows = read_rows(tmp_path / "dicom.csv")
    np.testing.assert_allclose(probabilities(rows, ["normal", "lesion"]), reference[3:4], atol=1e-6)
    assert "MRN" not in (tmp_path / "dicom.csv").read_text() and "Doe" not in (tmp_path / "dicom.csv").read_text()


def test_bad_inputs_get_error_rows_the_rest_is_scored_and_the_exit_code_says_so(tiny_run, test_split, tmp_path):
    root, _ = tiny_run
    folder = export_pngs(test_split["images"][:2], tmp_path / "in")
    (folder / "Doe_Jane_MRN1234.png").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    good = (folder / "00000.png").read_bytes()
    (folder / "cut.png").write_bytes(good[: len(good) // 2])
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(folder / "big.png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "rgb.png")
    from pydicom.data import get_testdata_file
    (folder / "plan.dcm").write_bytes(Path(get_testdata_file("rtplan.dcm")).read_bytes())
    result = subprocess.run([sys.executable, "-m", "pipeline.predict", str(folder), "-o", str(tmp_path / "out.csv"),
                             "--model", str(root / "models/model.pt")], capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", SALT_ENV: "test-salt"}, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: 6 input(s) could not be scored")
    assert "Traceback" not in result.stderr
    rows = read_rows(tmp_path / "out.csv")
    assert len(rows) == 8
    statuses = sorted(r["status"].split(" (")[0] for r in rows if r["status"].startswith("error"))
    assert statuses == ["error: DICOM file without pixel data", "error: empty file",
                        "error: image is 32×32×3 but the model takes 32×32×1",
                        "error: image is 40×40×1 but the model takes 32×32×1", "error: not a readable image",
                        "error: not a readable image"]
    assert all(r["prob_normal"] == "" and r["prediction"] == "" for r in rows if r["status"].startswith("error"))
    assert sum(r["status"] in ("ok", OOD_WARNING) for r in rows) == 2
    assert "Doe" not in (tmp_path / "out.csv").read_text() and "MRN" not in (tmp_path / "out.csv").read_text()
    assert "predict: 8 image(s)" in result.stdout


def test_missing_input_is_one_clear_error_and_no_output(tiny_run, tmp_path):
    root, _ = tiny_run
    with pytest.raises(PipelineError, match="absent: not found"):
        predict.run(tmp_path / "absent", tmp_path / "out.csv", root / "models/model.pt")
    with pytest.raises(PipelineError, match="model checkpoint not found"):
        predict.run(tmp_path, tmp_path / "out.csv", tmp_path / "no-model.pt")
    # Run outside the project, the default package is not there: the message says why.
    with pytest.raises(PipelineError, match=rf"no model package at models/model.pt in {tmp_path}: run predict from "
                                            "the medcnn project folder"):
        predict.run(tmp_path, tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


def test_file_ids_need_a_secret_salt_or_say_they_are_paths(tiny_run, test_split, tmp_path, monkeypatch):
    root, _ = tiny_run
    folder = export_pngs(test_split["images"][:2], tmp_path / "in")
    monkeypatch.delenv(SALT_ENV)
    with pytest.raises(PipelineError, match=rf"\${SALT_ENV} is not set: without a secret salt anyone"):
        predict.run(folder, tmp_path / "out.csv", root / "models/model.pt")
    assert not (tmp_path / "out.csv").exists()
    predict.run(folder, tmp_path / "paths.csv", root / "models/model.pt", ids="path")
    assert [r["id"] for r in read_rows(tmp_path / "paths.csv")] == ["00000.png", "00001.png"]
    np.savez(tmp_path / "new.npz", test_images=test_split["images"][:2])  # positions are not patient data
    predict.run(tmp_path / "new.npz", tmp_path / "npz.csv", root / "models/model.pt")
    assert [r["id"] for r in read_rows(tmp_path / "npz.csv")] == ["test-000000", "test-000001"]
    monkeypatch.setenv(SALT_ENV, "secret")
    predict.run(folder, tmp_path / "hashed.csv", root / "models/model.pt")
    hashed = [r["id"] for r in read_rows(tmp_path / "hashed.csv")]
    assert all(i.startswith("img-") and len(i) == 20 for i in hashed) and "00000" not in "".join(hashed)


def test_out_of_distribution_images_are_scored_but_flagged(tiny_run, test_split, tmp_path):
    root, _ = tiny_run
    package = load_package(root / "models/model.pt")
    typical = test_split["images"]
    assert package.out_of_distribution(typical).mean() < 0.05  # test images look like training images
    inverted = 255 - typical[:10]
    saturated = np.full((3, 32, 32, 1), 255, np.uint8)
    assert package.out_of_distribution(inverted).all() and package.out_of_distribution(saturated).all()
    folder = export_pngs(np.concatenate([inverted[:1], saturated[:1], typical[:1]]), tmp_path / "odd")
    predict.run(folder, tmp_path / "out.csv", root / "models/model.pt")
    rows = read_rows(tmp_path / "out.csv")
    assert [r["status"] for r in rows[:2]] == [OOD_WARNING, OOD_WARNING] and rows[0]["prob_lesion"] != ""


def test_explain_writes_grad_cam_and_ig_overlays(tiny_run, test_split, tmp_path):
    root, _ = tiny_run
    folder = export_pngs(test_split["images"][:3], tmp_path / "in")
    predict.run(folder, tmp_path / "out.csv", root / "models/model.pt", tmp_path / "overlays", root / "params.yaml")
    ids = [r["id"] for r in read_rows(tmp_path / "out.csv")]
    assert sorted(p.stem for p in (tmp_path / "overlays").iterdir()) == sorted(ids)
    assert all((tmp_path / "overlays" / f"{i}.png").stat().st_size > 2000 for i in ids)
