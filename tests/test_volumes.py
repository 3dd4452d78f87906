"""Volumes: the 3-D phantom, NIfTI files, DICOM series and MedMNIST 3-D arrays through prepare;
3-D networks, augmentation, training, explanation and prediction; every bad volume input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import balance, evaluate, explain, predict, prepare, report, train
from pipeline.core.dataset import marker_region
from pipeline.core.errors import PipelineError
from pipeline.core.files import load_npy, read_json
from pipeline.data import phantom
from pipeline.data.dicom import ImageError
from pipeline.data.volumes import preprocess_volume, read_nifti, read_series, window
from pipeline.modeling.networks import ModelConfig, build_model
from pipeline.modeling.recipe import augment
from pipeline.xai.attributions import grid_mask
from tests.conftest import tiny_params

SALT = "test-salt"
VOLUMES = {"data.phantom.ndim": 3, "data.phantom.image_size": 16, "data.phantom.n_train": 64,
           "data.phantom.n_val": 32, "data.phantom.n_test": 32, "data.phantom.lesion_radius": [3.0, 5.0]}


def hu_volume(seed: int, shape=(6, 12, 10)) -> np.ndarray:
    """A CT-like int16 volume in Hounsfield units: air around a soft-tissue ellipsoid."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]]
    inside = ((z - shape[0] / 2) / shape[0]) ** 2 + ((y - shape[1] / 2) / shape[1]) ** 2 + ((x - shape[2] / 2) / shape[2]) ** 2 < 0.2
    return np.where(inside, 40 + rng.integers(-30, 30, shape), -1000).astype(np.int16)


def write_nifti(path, volume_zyx: np.ndarray, spacing=(2.0, 1.0, 1.0)):
    """``volume_zyx`` (axial slices, anterior at the top) as a RAS NIfTI file with ``spacing`` (z, y, x)."""
    import nibabel

    xyz = volume_zyx[:, ::-1, :].transpose(2, 1, 0)
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(np.ascontiguousarray(xyz), affine), path)
    return path


def write_series(folder, volume_zyx: np.ndarray, spacing=(2.5, 0.8, 0.8), patient="PAT-1", names=None,
                 positions=None, orientation=(1, 0, 0, 0, 1, 0)):
    """One DICOM CT slice per file (RescaleIntercept -1024), named by ``names`` (shuffled order on disk)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series = generate_uid(entropy_srcs=[str(folder)])
    names = names or [f"slice{k:03d}.dcm" for k in range(len(volume_zyx))]
    for k, plane in enumerate(volume_zyx):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = CTImageStorage, ExplicitVRLittleEndian
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(folder), str(k)])
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID, series
        ds.PatientID, ds.PatientName, ds.Modality = patient, "Doe^Jane", "CT"
        ds.Rows, ds.Columns = plane.shape
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.ImageOrientationPatient = list(orientation)
        ds.ImagePositionPatient = [0.0, 0.0, positions[k] if positions else k * spacing[0]]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (plane.astype(np.int32) + 1024).astype(np.uint16).tobytes()
        pydicom.dcmwrite(folder / names[k], ds, enforce_file_format=True)
    return folder


# --- the 3-D phantom --------------------------------------------------------------------------

def test_phantom_volumes_are_deterministic_with_3d_masks_and_marker(tmp_path):
    params = tiny_params(tmp_path, **VOLUMES, **{"data.phantom.shortcut": 1.0}).data.phantom
    a, b = phantom.generate_split(params, 7, "train"), phantom.generate_split(params, 7, "train")
    assert a["images"].shape == (64, 16, 16, 16, 1) and a["masks"].shape == (64, 16, 16, 16)
    assert a["images"].tobytes() == b["images"].tobytes()
    assert (a["masks"].reshape(64, -1).any(axis=1) == (a["labels"] == 1)).all()  # a mask exactly for lesions
    cube = marker_region(phantom.marker_box(16), (16, 16, 16))
    assert cube.sum() == 8 and (a["images"][a["markers"] == 1][:, cube] == 230).all()
    lesion = a["labels"] == 1
    inside = a["images"][lesion][a["masks"][lesion].astype(bool)].mean()
    assert inside > a["images"][~lesion].mean() + 20  # the lesion is brighter than the average scan


def test_prepare_volumes_meta_and_summary(tmp_path):
    summary = prepare.run(tiny_params(tmp_path, **VOLUMES), tmp_path / "prepared", tmp_path / "summary.json")
    assert summary["image_size"] == [16, 16, 16] and summary["channels"] == 1
    assert np.load(tmp_path / "prepared/train/images.npy", mmap_mode="r").shape == (64, 16, 16, 16, 1)
    assert np.load(tmp_path / "prepared/test/masks.npy").shape == (32, 16, 16, 16)


# --- NIfTI ------------------------------------------------------------------------------------

def test_nifti_reads_reorients_and_windows(tmp_path):
    hu = hu_volume(0)
    volume, tags = read_nifti(write_nifti(tmp_path / "a.nii.gz", hu), 40.0, 400.0)
    assert volume.shape == (*hu.shape, 1) and tags == {"spacing": [2.0, 1.0, 1.0]}
    np.testing.assert_array_equal(volume[..., 0], window(hu.astype(np.float64), 40.0, 400.0))
    # A LPS-oriented copy of the same voxels reads back the same volume (as_closest_canonical).
    import nibabel

    ras = nibabel.load(tmp_path / "a.nii.gz")
    flipped = nibabel.Nifti1Image(np.asarray(ras.dataobj)[::-1, ::-1, :].copy(), ras.affine @ np.diag([-1, -1, 1, 1]) +
                                  np.array([[0, 0, 0, (hu.shape[2] - 1) * 1.0], [0, 0, 0, (hu.shape[1] - 1) * 1.0],
                                            [0, 0, 0, 0], [0, 0, 0, 0]]))
    nibabel.save(flipped, tmp_path / "lps.nii")
    np.testing.assert_array_equal(read_nifti(tmp_path / "lps.nii", 40.0, 400.0)[0], volume)


def test_nifti_folder_prepares_resampled_volumes(tmp_path):
    for label, count in (("normal", 8), ("tumour", 6)):
        for i in range(count):
            write_nifti(tmp_path / "nii" / label / f"case{i}.nii.gz", hu_volume([len(label), i]))
    summary = prepare.run(tiny_params(tmp_path, **{"data.source": "folder", "data.path": str(tmp_path / "nii"),
                                                   "data.image_size": 8, "data.pseudonym_salt": SALT,
                                                   "data.dicom.window_center": 40.0, "data.dicom.window_width": 400.0}),
                          tmp_path / "prepared", tmp_path / "summary.json")
    assert summary["image_size"] == [8, 8, 8] and summary["preprocessing"]["resized"] == 14
    assert summary["preprocessing"]["original_sizes"] == {"6x12x10x1": 14}
    train_images = load_npy(tmp_path / "prepared/train/images.npy")
    assert train_images.shape[1:] == (8, 8, 8, 1) and train_images.max() > 0
    assert not any("case" in i for i in load_npy(tmp_path / "prepared/train/ids.npy"))  # file names pseudonymised


def test_spacing_resamples_then_crops_or_pads():
    volume = np.zeros((10, 20, 20, 1), np.uint8)
    volume[4:6, 9:11, 9:11] = 200
    out = preprocess_volume(volume, [3.0, 1.0, 1.0], 16, 1.5)  # z 10 → 20 voxels, then cropped to 16
    assert out.shape == (16, 16, 16, 1)
    peak = np.unravel_index(np.argmax(out[..., 0]), out.shape[:3])
    assert all(abs(p - 8) <= 2 for p in peak)  # the centre stays in the centre
    assert preprocess_volume(volume, None, 8, None).shape == (8, 8, 8, 1)
    with pytest.raises(ImageError, match="no voxel spacing"):
        preprocess_volume(volume, None, 8, 1.0)


@pytest.mark.parametrize("case, message", [
    ("truncated", "not a readable NIfTI file"),
    ("flat", "a 2-D image among volumes"),
    ("zero_spacing", "positive spacing"),
])
def test_bad_nifti_inputs_fail_with_one_clear_error(tmp_path, case, message):
    import nibabel

    root = tmp_path / "nii"
    for label in ("a", "b"):
        for i in range(4):
            write_nifti(root / label / f"v{i}.nii.gz", hu_volume([ord(label), i]))
    bad = root / "a" / "bad.nii.gz"
    if case == "truncated":
        write_nifti(bad, hu_volume(9))
        bad.write_bytes(bad.read_bytes()[:-200])
    elif case == "flat":
        nibabel.save(nibabel.Nifti1Image(hu_volume(9)[0][:, :, None].astype(np.int16), np.eye(4)), bad)
    else:
        image = nibabel.Nifti1Image(hu_volume(9), np.eye(4))
        image.header.set_zooms((1.0, 0.0, 1.0))
        nibabel.save(image, bad)
    with pytest.raises(PipelineError, match=message) as error:
        prepare.run(tiny_params(tmp_path, **{"data.source": "folder", "data.path": str(root),
                                             "data.pseudonym_salt": SALT}), tmp_path / "prepared", tmp_path / "s.json")
    assert "bad.nii.gz" in str(error.value)
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "s.json").exists()


# --- DICOM series -----------------------------------------------------------------------------

def test_dicom_series_ordered_by_position_not_file_name(tmp_path):
    hu = hu_volume(3)
    shuffled = [f"{name}.dcm" for name in ("q", "c", "x", "a", "m", "f")]  # file order says nothing
    write_series(tmp_path / "s", hu, names=shuffled)
    volume, tags = read_series(tmp_path / "s", None, None)
    assert volume.shape == (*hu.shape, 1) and tags["spacing"] == [2.5, 0.8, 0.8] and tags["Modality"] == "CT"
    assert "PatientID" not in tags and "PatientName" not in tags
    np.testing.assert_array_equal(volume[..., 0], window(hu.astype(np.float64), None, None))


@pytest.mark.parametrize("change, message", [
    ({"positions": [0.0, 2.5, 5.0, 10.0, 12.5, 15.0]}, "missing slice"),
    ({"positions": [0.0, 2.5, 5.0, 5.0, 7.5, 10.0]}, "duplicated slice position"),
    ("orientation", "mixed orientations"),
    ("one_slice", "at least 2 slices"),
])
def test_bad_series_are_refused(tmp_path, change, message):
    hu = hu_volume(4)
    if change == "orientation":
        write_series(tmp_path / "s", hu[:3], names=["a.dcm", "b.dcm", "c.dcm"])
        write_series(tmp_path / "s", hu[3:], names=["d.dcm", "e.dcm", "f.dcm"], orientation=(0, 1, 0, 0, 0, -1))
    elif change == "one_slice":
        write_series(tmp_path / "s", hu[:1])
    else:
        write_series(tmp_path / "s", hu, **change)
    with pytest.raises(ImageError, match=message):
        read_series(tmp_path / "s", None, None)


def test_series_folders_prepare_grouped_by_patient(tmp_path):
    root = tmp_path / "ct"
    for label in ("normal", "lesion"):
        for i in range(12):
            write_series(root / label / f"study{i}" / "series1", hu_volume([len(label), i]), patient=f"P{label}{i // 2}")
    summary = prepare.run(tiny_params(tmp_path, **{"data.source": "folder", "data.path": str(root),
                                                   "data.dicom.series": True, "data.image_size": 8,
                                                   "data.split": {"val": 0.25, "test": 0.25},
                                                   "data.pseudonym_salt": SALT}),
                          tmp_path / "prepared", tmp_path / "summary.json")
    assert summary["image_size"] == [8, 8, 8] and summary["checks"]["patient_overlap"] == 0
    assert sum(summary["splits"][s]["n"] for s in ("train", "val", "test")) == 24
    assert summary["dicom"] == {"Modality=CT": 24, "PhotometricInterpretation=MONOCHROME2": 24}
    text = (tmp_path / "summary.json").read_text() + "".join(
        str(load_npy(tmp_path / f"prepared/{s}/patients.npy").tolist()) for s in ("train", "val", "test"))
    assert "Pnormal" not in text and "Doe" not in text  # patient ids and names never leave the files


# --- MedMNIST 3-D arrays ----------------------------------------------------------------------

def test_medmnist_3d_npz_prepares_as_volumes(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 6), ("test", 6)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2)[:, None]
    np.savez(tmp_path / "organmnist3d.npz", **arrays)
    summary = prepare.run(tiny_params(tmp_path, **{"data.source": "npz", "data.path": str(tmp_path / "organmnist3d.npz")}),
                          tmp_path / "prepared", tmp_path / "summary.json")
    assert summary["image_size"] == [28, 28, 28]
    stored = load_npy(tmp_path / "prepared/train/images.npy")
    np.testing.assert_array_equal(stored[..., 0], arrays["train_images"])


# --- networks, augmentation, LIME features ----------------------------------------------------

@pytest.mark.parametrize("name", ["seed_cnn", "small_cnn", "resnet18"])
def test_3d_networks_take_volumes(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name, 1, 3, 16, 4, 0.5, 0.25, "batch", ndim=3)).eval()
    assert model(torch.rand(2, 1, 16, 16, 16)).shape == (2, 3)
    assert any(isinstance(m, torch.nn.Conv3d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def test_3d_augmentation_is_seeded_and_flips_only_left_right(tmp_path):
    cfg = tiny_params(tmp_path, **{"train.aug_rotate": 0.0, "train.aug_scale": 0.0, "train.aug_flip": True}).train
    x = torch.rand(8, 1, 6, 6, 6)
    out = augment(x, cfg, torch.Generator().manual_seed(1))
    flipped = [bool((o == v.flip(-1)).all()) for o, v in zip(out, x)]
    assert all(f or bool((o == v).all()) for f, o, v in zip(flipped, out, x)) and 0 < sum(flipped) < 8
    cfg = tiny_params(tmp_path, **{"train.aug_rotate": 10.0, "train.aug_translate": 0.1}).train
    a, b = (augment(x, cfg, torch.Generator().manual_seed(2)) for _ in range(2))
    assert torch.equal(a, b) and not torch.equal(a, x) and a.shape == x.shape


def test_lime_grid_labels_cubes():
    features = grid_mask((4, 6, 6), 2)
    assert features.shape == (4, 6, 6) and sorted(features.unique().tolist()) == list(range(8))
    assert (features[:2, :3, :3] == 0).all() and (features[2:, 3:, 3:] == 7).all()


# --- the 3-D pipeline -------------------------------------------------------------------------

@pytest.fixture
def volumes(tmp_path):
    """The tiny 3-D phantom prepared, balanced, trained and evaluated in ``tmp_path``."""
    params = tiny_params(tmp_path, **VOLUMES, **{"data.phantom.shortcut": 0.5})
    prepare.run(params, tmp_path / "data/prepared", tmp_path / "reports/data/summary.json")
    balance.run(params)
    train.run(params)
    evaluate.run(params)
    return tmp_path, params


def test_3d_training_is_deterministic_and_resumes(volumes, monkeypatch):
    root, params = volumes
    args = (root / "data/prepared", root / "data/balanced")
    train.run(params, *args, root / "again/model.pt", root / "again", root / "again/last.pt")
    assert (root / "again/model.pt").read_bytes() == (root / "models/network.pt").read_bytes()
    real_epoch, calls = train.train_epoch, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*a, **kw)

    monkeypatch.setattr(train, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.run(params, *args, root / "resumed/model.pt", root / "resumed", root / "resumed/last.pt")
    monkeypatch.setattr(train, "train_epoch", real_epoch)
    train.run(params, *args, root / "resumed/model.pt", root / "resumed", root / "resumed/last.pt")
    assert (root / "resumed/model.pt").read_bytes() == (root / "models/network.pt").read_bytes()


def test_3d_evaluate_explain_and_predict(volumes):
    root, params = volumes
    metrics = read_json(root / "reports/eval/metrics.json")
    assert 0 <= metrics["test"]["roc_auc"] <= 1
    robustness = metrics["robustness"]
    assert set(robustness["corruptions"]) == set(params.evaluate.corruptions)
    found = explain.run(params)
    assert found["n_samples"] >= 2
    for method in params.explain.methods:
        row = found["explain"][method]
        assert row["n_masks"] >= 1 and 0 <= row["mass_in_mask"] <= 1 and "marker_mass" in row
    maps = np.load(root / "reports/explain/attributions.npy")
    assert maps.shape[2:] == (16, 16, 16)
    samples = read_json(root / "reports/explain/samples.json")["samples"]
    assert all((root / "reports/explain/figures" / s["figure"]).stat().st_size > 10_000 for s in samples)
    page = report.run(params).read_text()
    assert "16³ voxels (volumes, 3-D layers)" in page and "16×16×16" in page
    assert "baseline_voxel_pooling" not in metrics and "same pixels" in page  # 16³ = 4096 voxels: not pooled
    # New volumes, as a user has them: NIfTI files and a DICOM series folder.
    incoming = root / "incoming"
    write_nifti(incoming / "scan1.nii.gz", hu_volume(11, (16, 16, 16)))
    write_nifti(incoming / "scan2.nii", hu_volume(12, (16, 16, 16)))
    write_series(incoming / "ct-series", hu_volume(13, (16, 16, 16)), names=["b.dcm", "a.dcm"] + [
        f"s{k}.dcm" for k in range(14)])  # a model of volumes reads a folder of .dcm files as one series
    flat = incoming / "flat.nii"
    write_nifti(flat, hu_volume(14, (1, 16, 16)))  # not a volume: that row fails, the others are scored
    counts = predict.run(incoming, root / "scores.csv", root / "models/model.pt")
    assert counts["error"] == 1 and counts["ok"] + counts["warning"] == 3, counts
    # The served (MLflow pyfunc) model takes volumes as nested lists, as an HTTP request carries them.
    from pipeline.modeling.package import load_package
    from pipeline.modeling.pyfunc import PackagePredictor

    package = load_package(root / "models/model.pt")
    volumes_in = np.load(root / "data/prepared/test/images.npy")[:3]
    served = PackagePredictor(package).predict(volumes_in.tolist())
    np.testing.assert_allclose(served[["prob_normal", "prob_lesion"]].to_numpy(),
                               package.score(volumes_in).probabilities, rtol=0, atol=1e-12)
    rows = (root / "scores.csv").read_text()
    assert "scan1" not in rows and "ct-series" not in rows  # pseudonymous ids only


def test_volume_corruptions_match_their_slice_by_slice_definition():
    from pipeline.evaluation.corruptions import CORRUPTIONS, corrupt

    rng = np.random.default_rng(0)
    volumes = rng.integers(0, 256, (2, 4, 16, 16, 1), dtype=np.uint8)
    slices = volumes.reshape(8, 16, 16, 1)
    for name in ("jpeg", "pixelate"):
        np.testing.assert_array_equal(corrupt(volumes, name, 2, rng).reshape(slices.shape), corrupt(slices, name, 2, rng))
    for name in CORRUPTIONS:
        assert corrupt(volumes, name, 3, np.random.default_rng(1)).shape == volumes.shape
        assert corrupt(volumes, name, 0, rng) is volumes


def test_baselines_pool_large_volumes_to_image_sized_features():
    from pipeline.evaluation.baselines import _flat, pooling

    assert [pooling((1, *shape)) for shape in ((64, 64, 1), (16, 16, 16, 1), (28, 28, 28, 1), (32, 32, 32, 1),
                                               (64, 64, 64, 1))] == [1, 1, 2, 2, 4]
    volumes = np.arange(2 * 32**3, dtype=np.int64).reshape(2, 32, 32, 32, 1) % 251
    flat = _flat(volumes.astype(np.uint8))
    assert flat.shape == (2, 16**3)
    assert flat[0, 0] == np.float32(volumes[0, :2, :2, :2].mean() / 255)
