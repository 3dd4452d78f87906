"""No patient identifier reaches an output, the report or MLflow.

DICOM copies of pydicom's bundled samples, each given a patient name, id, birth date and
study date, run through every stage and the MLflow track stage; then every byte under
data/prepared, reports/ and the MLflow store is searched for those strings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline import track
from pipeline.data.privacy import pseudonym, public_params, redact
from tests.conftest import run_stages, tiny_params

PHI = {"name": "Doe^Janet", "id": "PHI-ID-", "birth": "19450317", "study": "20040119", "accession": "ACC-778899"}


def dicom_folder(root: Path) -> Path:
    import pydicom
    from pydicom.data import get_testdata_file

    rng = np.random.default_rng(0)
    for cls, sample in (("ct", "CT_small.dcm"), ("mr", "MR_small.dcm")):
        template = pydicom.dcmread(get_testdata_file(sample))
        pixels = template.pixel_array
        for k in range(12):
            ds = pydicom.dcmread(get_testdata_file(sample))
            noisy = np.clip(pixels.astype(np.int32) + rng.integers(-40, 40, pixels.shape), -2000, 4000)
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
            ds.PixelData = noisy.astype(pixels.dtype.newbyteorder("<")).tobytes()
            ds.PatientName = f"{PHI['name']}{k}"
            ds.PatientID = f"{PHI['id']}{cls}{k:03d}"
            ds.PatientBirthDate = PHI["birth"]
            ds.StudyDate = PHI["study"]
            ds.AccessionNumber = PHI["accession"]
            (root / cls).mkdir(parents=True, exist_ok=True)
            # The file name carries the patient id too, as PACS exports often do.
            ds.save_as(root / cls / f"{ds.PatientID}_{k}.dcm")
    return root


def test_no_phi_anywhere_after_the_whole_pipeline(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDCNN_PSEUDONYM_SALT", "a-secret-salt")
    mlflow_store = tmp_path / "store"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(mlflow_store))
    folder = dicom_folder(tmp_path / "pacs_export")
    root = tmp_path / "project"
    root.mkdir()
    params = tiny_params(root, **{"data.source": "folder", "data.path": str(folder), "data.image_size": 32,
                                  "data.channels": 1, "data.pseudonym_salt": "", "data.split": {"val": 0.2, "test": 0.3}})
    run_stages(root, params, ("prepare", "balance", "train", "evaluate", "explain", "report"))
    track.run(params, root, root / "reports/mlflow_run.json")
    summary = (root / "reports/data/summary.json").read_text()
    assert '"Modality=CT"' in summary and "PatientName" not in summary
    files = [p for base in (root / "data", root / "reports", mlflow_store) for p in base.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any("mlartifacts" in p.parts for p in files)
    for path in files:
        data = path.read_bytes()
        for what, value in PHI.items():
            assert value.encode() not in data, f"{what} found in {path}"
        assert b"a-secret-salt" not in data, f"salt found in {path}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri exported it


def test_pseudonyms_are_salted_and_stable():
    assert pseudonym("MRN1", "s1") == pseudonym("MRN1", "s1") != pseudonym("MRN1", "s2")
    assert pseudonym("MRN1", "s1").startswith("p-") and "MRN1" not in pseudonym("MRN1", "s1")
    assert public_params({"data.pseudonym_salt": "x", "train.lr": 0.1}) == {"data.pseudonym_salt": "***", "train.lr": 0.1}
    assert redact("salt: x-y\n", "x-y") == "salt: ***\n" and redact("a", "") == "a"


@pytest.mark.parametrize("tag", ["PatientName", "PatientID", "PatientBirthDate", "StudyDate", "InstitutionName"])
def test_dicom_whitelist_excludes_identifying_tags(tag):
    from pipeline.data.dicom import WHITELIST

    assert tag not in WHITELIST
