"""Folders, CSV manifests, DICOM, MedMNIST downloads: every source, the checks, every bad input."""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline import prepare
from pipeline.core.errors import PipelineError
from pipeline.core.files import file_digest, load_npy, read_json
from pipeline.data import catalog, medmnist, patient_split
from pipeline.data.dicom import ImageError
from pipeline.data.images import preprocess, read_file
from tests.conftest import MEDMNIST, tiny_params

SALT = "test-salt"


def png(path, seed, size=(20, 20), mode="L"):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = size[::-1] + ((3,) if mode == "RGB" else ())
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def image_folder(root, per_class=(14, 6), **kw):
    for label, count in zip(("benign", "malignant"), per_class):
        for i in range(count):
            png(root / label / f"case{i:03d}.png", seed=[zlib.crc32(label.encode()), i], **kw)
    return root


def prepare_run(tmp_path, **overrides):
    params = tiny_params(tmp_path, **{"data.pseudonym_salt": SALT, **overrides})
    return prepare.run(params, tmp_path / "prepared", tmp_path / "summary.json")


def sub(tmp_path, name):
    (tmp_path / name).mkdir()
    return tmp_path / name


def assert_no_output(tmp_path):
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "summary.json").exists()
    assert not list(tmp_path.glob(".prepared*"))


# --- folder -----------------------------------------------------------------------------------

def test_folder_classes_sorted_resized_and_split(tmp_path):
    root = image_folder(tmp_path / "imgs", size=(30, 24), mode="RGB")
    summary = prepare_run(tmp_path, **{"data.source": "folder", "data.path": str(root),
                                       "data.image_size": 16, "data.channels": 1})
    assert summary["class_names"] == ["benign", "malignant"]
    assert summary["image_size"] == [16, 16] and summary["channels"] == 1
    assert sum(summary["splits"][s]["n"] for s in ("train", "val", "test")) == 20
    assert sum(summary["splits"][s]["class_counts"]["malignant"] for s in ("train", "val", "test")) == 6
    assert summary["input"]["files"] == 20 and len(summary["input"]["files_sha256"]) == 64
    ids = np.concatenate([load_npy(tmp_path / "prepared" / s / "ids.npy") for s in ("train", "val", "test")])
    assert all(i.startswith("img-") and "case" not in i for i in ids)  # file names never saved
    assert len(set(ids)) == 20


def test_same_params_give_same_bytes(tmp_path):
    root = image_folder(tmp_path / "imgs")
    a = prepare_run(sub(tmp_path, "a"), **{"data.source": "folder", "data.path": str(root)})
    b = prepare_run(sub(tmp_path, "b"), **{"data.source": "folder", "data.path": str(root)})
    assert a["outputs_sha256"] == b["outputs_sha256"]


@pytest.mark.parametrize(("setup", "message"), [
    (lambda r: (r / "malignant").mkdir(parents=True) or image_folder(r, per_class=(4, 0)), "empty class folder"),
    (lambda r: image_folder(r) and (r / "benign" / "notes.txt").write_text("hi"), "not an image"),
    (lambda r: image_folder(r) and (r / "benign" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really"), "cannot read"),
    (lambda r: image_folder(r) and (r / "benign" / "empty.png").write_bytes(b""), "empty file (0 bytes)"),
    (lambda r: image_folder(r) and png(r / "benign" / "big.png", 1, size=(40, 40)), "image size differs"),
    (lambda r: (r / "only").mkdir(parents=True) or png(r / "only" / "a.png", 1), "at least 2 are needed"),
    (lambda r: image_folder(r) and shutil.copy(dicom_sample("rtplan.dcm"), r / "benign" / "plan.dcm"),
     "DICOM file without pixel data"),
])
def test_bad_folders_fail_cleanly(tmp_path, setup, message):
    root = tmp_path / "imgs"
    setup(root)
    with pytest.raises(PipelineError) as err:
        prepare_run(tmp_path, **{"data.source": "folder", "data.path": str(root)})
    assert message in str(err.value) and str(root) in str(err.value)
    assert_no_output(tmp_path)


def test_truncated_image_and_error_lists_first_ten(tmp_path):
    root = image_folder(tmp_path / "imgs")
    data = (root / "benign" / "case000.png").read_bytes()
    for i in range(12):
        (root / "benign" / f"cut{i:02d}.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineError) as err:
        prepare_run(tmp_path, **{"data.source": "folder", "data.path": str(root)})
    text = str(err.value)
    assert "12 file(s)" in text and "(2 more)" in text and text.count("cut") == 10
    assert_no_output(tmp_path)


def test_on_error_skip_lists_skipped_files(tmp_path):
    root = image_folder(tmp_path / "imgs")
    (root / "benign" / "empty.png").write_bytes(b"")
    (root / "malignant" / "readme.txt").write_text("x")
    summary = prepare_run(tmp_path, **{"data.source": "folder", "data.path": str(root), "data.on_error": "skip"})
    assert summary["excluded"] == 2
    reasons = sorted(s["reason"] for s in summary["skipped"])
    assert reasons == ["empty file (0 bytes)", "not an image file"]
    assert all(s["id"].startswith("img-") for s in summary["skipped"])
    assert sum(summary["splits"][s]["n"] for s in ("train", "val", "test")) == 20


# --- CSV manifest -----------------------------------------------------------------------------

def manifest(tmp_path, rows, header="path,label,patient_id"):
    folder = tmp_path / "study"
    for row in rows:
        rel = row.split(",")[0]
        if not rel.startswith("..") and not (folder / rel).exists() and "missing" not in rel:
            png(folder / rel, seed=zlib.crc32(rel.encode()))
    path = folder / "manifest.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def patient_rows(n_patients=20, per_patient=3):
    rows = []
    for p in range(n_patients):
        label = "disease" if p % 4 == 0 else "healthy"
        rows += [f"img/p{p:02d}_{k}.png,{label},MRN{p:05d}" for k in range(per_patient)]
    return rows


def test_csv_grouped_split_keeps_patients_together(tmp_path):
    path = manifest(tmp_path, patient_rows())
    summary = prepare_run(tmp_path, **{"data.source": "csv", "data.path": str(path)})
    assert summary["class_names"] == ["disease", "healthy"]
    patients = {s: set(load_npy(tmp_path / "prepared" / s / "patients.npy")) for s in ("train", "val", "test")}
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"] or patients["val"] & patients["test"])
    assert sum(summary["splits"][s]["patients"] for s in patients) == 20
    assert summary["checks"]["patient_overlap"] == 0
    raw = b"".join(p.read_bytes() for p in (tmp_path / "prepared").rglob("*") if p.is_file()) + (tmp_path / "summary.json").read_bytes()
    assert b"MRN000" not in raw  # patient ids are pseudonymised before anything is saved


def test_csv_given_splits_integer_labels_and_groups(tmp_path):
    rows = [f"a{i}.png,{i % 2},P{i},{['train', 'train', 'val', 'test'][i % 4]},site{i % 3}" for i in range(16)]
    path = manifest(tmp_path, rows, header="path,label,patient_id,split,site")
    summary = prepare_run(tmp_path, **{"data.source": "csv", "data.path": str(path), "data.group_column": "site"})
    assert summary["split_method"] == "the train/val/test splits given in the manifest"
    assert [summary["splits"][s]["n"] for s in ("train", "val", "test")] == [8, 4, 4]
    assert summary["class_names"] == ["0", "1"] and summary["group_name"] == "site"
    assert set(load_npy(tmp_path / "prepared" / "test" / "groups.npy")) <= {"site0", "site1", "site2"}


def test_patient_in_two_given_splits_is_an_error(tmp_path):
    rows = [f"a{i}.png,{i % 2},SAME{i % 3},{['train', 'val', 'test'][i % 3 if i < 3 else 0]}" for i in range(9)]
    rows[4] = "a4.png,0,SAME0,test"
    path = manifest(tmp_path, rows, header="path,label,patient_id,split")
    with pytest.raises(PipelineError, match="appear in more than one split"):
        prepare_run(tmp_path, **{"data.source": "csv", "data.path": str(path)})
    assert_no_output(tmp_path)


@pytest.mark.parametrize(("bad_row", "message"), [
    ("../../etc/passwd,healthy,X", "path leaves the manifest's folder"),
    ("img/missing.png,healthy,X", "file does not exist"),
    ("img/p00_0.png,healthy,MRN00000", "duplicate path"),
    ("img/extra.png,unknown-label,X", "label not in the class list"),
])
def test_bad_manifest_rows(tmp_path, bad_row, message):
    path = manifest(tmp_path, patient_rows() + [bad_row])
    with pytest.raises(PipelineError) as err:
        prepare_run(tmp_path, **{"data.source": "csv", "data.path": str(path),
                                 "data.class_names": ["disease", "healthy"]})
    assert message in str(err.value) and "manifest.csv" in str(err.value)
    assert_no_output(tmp_path)


def test_patient_ids_need_a_salt(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDCNN_PSEUDONYM_SALT", raising=False)
    path = manifest(tmp_path, patient_rows())
    with pytest.raises(PipelineError, match="MEDCNN_PSEUDONYM_SALT"):
        prepare_run(tmp_path, **{"data.source": "csv", "data.path": str(path), "data.pseudonym_salt": ""})
    monkeypatch.setenv("MEDCNN_PSEUDONYM_SALT", "from-env")
    assert prepare_run(tmp_path, **{"data.source": "csv", "data.path": str(path), "data.pseudonym_salt": ""})


def test_empty_split_after_splitting(tmp_path):
    path = manifest(tmp_path, patient_rows(n_patients=2, per_patient=4))
    with pytest.raises(PipelineError, match="is empty|cannot split"):
        prepare_run(tmp_path, **{"data.source": "csv", "data.path": str(path)})
    assert_no_output(tmp_path)


# --- duplicates -------------------------------------------------------------------------------

def duplicated_folder(tmp_path):
    root = image_folder(tmp_path / "imgs", per_class=(16, 8))
    for i in range(3):  # three exact copies of one image
        shutil.copy(root / "benign" / "case000.png", root / "benign" / f"copy{i}.png")
    return root


def test_duplicates_warn_drop_error(tmp_path):
    root = duplicated_folder(tmp_path)
    warn = prepare_run(sub(tmp_path, "w"),
                       **{"data.source": "folder", "data.path": str(root), "data.duplicates": "warn"})
    checks = warn["checks"]
    assert sum(checks["duplicates_within_splits"].values()) + checks["duplicates_across_splits"] == 3
    assert len(checks["duplicate_ids"]) == 3 and checks["duplicates_dropped"] == 0
    drop = prepare_run(sub(tmp_path, "d"),
                       **{"data.source": "folder", "data.path": str(root), "data.duplicates": "drop"})
    assert sum(drop["splits"][s]["n"] for s in ("train", "val", "test")) == 24
    assert drop["checks"]["duplicates_dropped"] == 3
    (tmp_path / "e").mkdir()
    with pytest.raises(PipelineError, match="exact duplicate image"):
        prepare_run(tmp_path / "e", **{"data.source": "folder", "data.path": str(root), "data.duplicates": "error"})
    assert_no_output(tmp_path / "e")


# --- splitting invariant ------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 29), st.integers(0, 2)), min_size=30, max_size=120), st.integers(0, 10**6))
@example(pairs=[(0, 0)] * 28 + [(1, 0), (2, 1)], seed=0)  # too few images per class left to stratify val
def test_grouped_split_never_shares_a_patient(pairs, seed):
    patients = np.array([f"p{p}" for p, _ in pairs])
    # A patient's label is fixed by its first image, as in real data.
    first = {}
    labels = np.array([first.setdefault(p, lab) for p, lab in zip(patients, [lab for _, lab in pairs])])
    if len(set(patients)) < 3:
        return
    assigned = patient_split.assign(labels, patients, 0.1, 0.2, seed)
    for pid in set(patients):
        assert len(set(assigned[patients == pid])) == 1
    assert patient_split.overlap({s: patients[assigned == s] for s in ("train", "val", "test")}) == []


# --- DICOM ------------------------------------------------------------------------------------

def dicom_sample(name):
    from pydicom.data import get_testdata_file

    return get_testdata_file(name)


def test_dicom_rescale_window_and_monochrome1(tmp_path):
    import pydicom

    ct = dicom_sample("CT_small.dcm")
    image, tags = read_file(Path(ct))
    assert image.shape == (128, 128, 1) and image.dtype == np.uint8
    assert tags["Modality"] == "CT" and "PatientName" not in tags and "PatientID" not in tags
    ds = pydicom.dcmread(ct)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    windowed, _ = read_file(Path(ct), window_center=40.0, window_width=400.0)
    # DICOM PS3.3 C.11.2.1.2.1, LINEAR: ((x - (c - 0.5)) / (w - 1) + 0.5) of the output range, clipped.
    expected = np.rint(np.clip((hu - 39.5) / 399 + 0.5, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(windowed[..., 0], expected)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "inverted.dcm")
    inverted, _ = read_file(tmp_path / "inverted.dcm", window_center=40.0, window_width=400.0)
    np.testing.assert_array_equal(inverted[..., 0], 255 - expected)


def test_dicom_voi_lut_sequence_and_sigmoid_window(tmp_path):
    """The file's own VOI: a LUT Sequence is looked up (not approximated by a window), SIGMOID is honoured."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(dicom_sample("CT_small.dcm"))
    hu = (ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).astype(int)
    first, n = int(hu.min()), int(hu.max() - hu.min()) + 1
    table = (np.arange(n) * 7) % 256  # deliberately not monotone: only a true lookup reproduces it
    item = Dataset()
    item.add_new(0x00283002, "SS" if first < 0 else "US", [n, first, 8])  # LUTDescriptor
    item.add_new(0x00283006, "US", table.tolist())  # LUTData
    ds.VOILUTSequence = Sequence([item])
    ds.save_as(tmp_path / "lut.dcm")
    image, _ = read_file(tmp_path / "lut.dcm")
    np.testing.assert_array_equal(image[..., 0], table[hu - first].astype(np.uint8))

    ds = pydicom.dcmread(dicom_sample("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 40, 400, "SIGMOID"
    ds.save_as(tmp_path / "sigmoid.dcm")
    image, _ = read_file(tmp_path / "sigmoid.dcm")
    expected = np.rint(255 / (1 + np.exp(-4 * (hu - 40) / 400))).astype(np.uint8)
    assert np.abs(image[..., 0].astype(int) - expected).max() <= 1


def test_dicom_without_pixels_and_multiframe(tmp_path):
    import pydicom

    with pytest.raises(ImageError, match="without pixel data"):
        read_file(Path(dicom_sample("rtplan.dcm")))
    ds = pydicom.dcmread(dicom_sample("MR_small.dcm"))
    pixels = ds.pixel_array
    frames = np.stack([pixels, pixels[::-1]]).astype(pixels.dtype.newbyteorder("<"))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.NumberOfFrames = 2
    ds.PixelData = frames.tobytes()
    ds.save_as(tmp_path / "multi.dcm")
    with pytest.raises(ImageError, match="multi-frame DICOM"):
        read_file(tmp_path / "multi.dcm")
    first, _ = read_file(tmp_path / "multi.dcm", frames="first")
    single, _ = read_file(Path(dicom_sample("MR_small.dcm")))
    np.testing.assert_array_equal(first, single)


def test_preprocess_crop_resize_channels():
    rgb = np.zeros((10, 20, 3), np.uint8)
    rgb[:, 5:15] = 200  # the centre square
    out = preprocess(rgb, 5, 1)
    assert out.shape == (5, 5, 1) and out.min() > 150
    assert preprocess(np.zeros((8, 8, 1), np.uint8), None, 3).shape == (8, 8, 3)


# --- MedMNIST download ------------------------------------------------------------------------

@pytest.mark.skipif(not (MEDMNIST / "breastmnist.npz").exists(), reason="shared MedMNIST data not present")
def test_medmnist_download_verify_and_cache(tmp_path):
    url = (MEDMNIST.resolve().as_uri()) + "/{file}"
    path = medmnist.fetch_medmnist("breastmnist", 28, tmp_path / "raw", url)
    assert path == tmp_path / "raw" / "breastmnist.npz"
    assert file_digest(path, "md5") == catalog.medmnist("breastmnist")["md5"][28]
    # Cached: a second call needs no network (the URL now points nowhere).
    assert medmnist.fetch_medmnist("breastmnist", 28, tmp_path / "raw", "file:///nonexistent/{file}") == path
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["breastmnist.npz"]


def test_medmnist_corrupt_file_is_kept_and_reported(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "breastmnist.npz").write_bytes(b"corrupted")
    with pytest.raises(PipelineError, match="does not match the official 750601b1"):
        medmnist.fetch_medmnist("breastmnist", 28, raw, "file:///nonexistent/{file}")
    assert (raw / "breastmnist.npz").read_bytes() == b"corrupted"


def test_medmnist_bad_download_and_no_network(tmp_path):
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "breastmnist.npz").write_bytes(b"not the official file")
    with pytest.raises(PipelineError, match="not kept"):
        medmnist.fetch_medmnist("breastmnist", 28, tmp_path / "raw", (tmp_path / "srv").as_uri() + "/{file}")
    with pytest.raises(PipelineError, match="place it at"):
        medmnist.fetch_medmnist("breastmnist", 28, tmp_path / "raw", "file:///nonexistent/{file}")
    assert list((tmp_path / "raw").iterdir()) == []


@pytest.mark.skipif(not (MEDMNIST / "breastmnist.npz").exists(), reason="shared MedMNIST data not present")
def test_medmnist_source_end_to_end_prepare(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(MEDMNIST / "breastmnist.npz", raw / "breastmnist.npz")  # as a user places it by hand
    summary = prepare_run(tmp_path, **{"data.source": "medmnist", "data.name": "breastmnist", "data.raw_dir": str(raw)})
    assert summary["input"]["source"] == "medmnist" and summary["splits"]["val"]["n"] == 78
    assert read_json(tmp_path / "summary.json")["input"]["path"] == "breastmnist.npz"
