"""Volumes (CT, MRI, PET) to uint8 D×H×W×1 arrays: NIfTI files, DICOM series, and their resampling.

- **NIfTI** (``.nii``, ``.nii.gz``) is read with nibabel, its scaling (``scl_slope``/``scl_inter``)
  applied, and reoriented to the closest RAS+ axes (``nibabel.as_closest_canonical``); the
  array is stored as axial slices (D: inferior → superior), rows anterior → posterior, columns
  in RAS x order.
- **DICOM series** (one folder per series, every ``.dcm`` file in it one slice): slices are
  ordered by their ImagePositionPatient projected on the slice normal (the cross product of
  ImageOrientationPatient's row and column directions), never by file name or InstanceNumber.
  A series with mixed orientations or slice sizes, a repeated position, or a gap (a step more
  than 1.5× the series' median step: a missing slice) is refused with one clear error. Each
  slice goes through the modality LUT (RescaleSlope/RescaleIntercept) as 2-D DICOM does.
- **Intensities**: one LINEAR window for the whole volume, ``data.dicom.window_center`` /
  ``window_width`` when set (CT presets in the README: brain 40/80, soft tissue 40/400, lung
  −600/1500, bone 400/1800), else the series' own first WindowCenter/WindowWidth, else the
  volume's own min..max; mapped to 0..255. MONOCHROME1 series are inverted.
- **Resampling** (:func:`preprocess_volume`): with ``data.spacing`` (mm) the volume is first
  resampled to that isotropic voxel spacing using the header's spacing, then centre-cropped or
  zero-padded to ``data.image_size`` in every axis; without it, resampled (trilinear) straight
  to ``data.image_size`` in every axis. Both are deterministic.

Only the voxel spacing and the whitelisted DICOM attributes (:data:`pipeline.data.dicom.WHITELIST`)
leave this module, plus a series' PatientID, which prepare pseudonymises at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.dicom import WHITELIST, ImageError, describe, is_dicom, plain

NIFTI_SUFFIXES = (".nii", ".nii.gz")
GAP_TOLERANCE = 1.5  # a step this many times the median step means a missing slice


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def read_nifti(path: Path, window_center: float | None, window_width: float | None) -> tuple[np.ndarray, dict[str, Any]]:
    """D×H×W×1 uint8 and ``{"spacing": [dz, dy, dx]}`` (mm); ImageError when unreadable or not a volume."""
    import nibabel

    try:
        image = nibabel.load(path)
        if len(image.shape) == 4 and image.shape[3] == 1:
            image = image.slicer[..., 0]
        if len(image.shape) != 3 or min(image.shape) < 2:
            raise ImageError(f"not a volume: NIfTI of shape {'×'.join(map(str, image.shape))} (a 2-D image among "
                             "volumes?); volumes need three axes of at least 2 voxels")
        _check_spacing(_stored_spacing(path, type(image.header)))
        image = nibabel.as_closest_canonical(image)
        values = np.asarray(image.get_fdata(dtype=np.float32))
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel, gzip and zlib raise many types for broken files
        raise ImageError(f"not a readable NIfTI file ({describe(exc, path)})") from None
    spacing = [float(z) for z in image.header.get_zooms()[:3]][::-1]
    volume = values.transpose(2, 1, 0)[:, ::-1, :]  # x, y, z (RAS) → axial slices, anterior at the top
    return window(volume, window_center, window_width)[..., None], {"spacing": spacing}


def _stored_spacing(path: Path, header_type: type) -> list[float]:
    """The voxel spacing the file states: nibabel's loader silently replaces a zero pixdim by 1,
    which would hide a broken header, so the header is read again without its fixes."""
    import gzip

    with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as handle:
        return [float(v) for v in header_type.from_fileobj(handle, check=False)["pixdim"][1:4]]


def series_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_dicom(p) and not p.name.startswith("."))


def read_series(folder: Path, window_center: float | None, window_width: float | None) -> tuple[np.ndarray, dict[str, Any]]:
    """One DICOM series folder → D×H×W×1 uint8 and whitelisted attributes with ``spacing`` [dz, dy, dx]."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    files = series_files(folder)
    if len(files) < 2:
        raise ImageError(f"a DICOM series needs at least 2 slices (.dcm files in its folder); found {len(files)}")
    slices = []
    for file in files:
        try:
            ds = pydicom.dcmread(file)
            pixels = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
            position = np.array([float(v) for v in ds.ImagePositionPatient])
            orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
        except AttributeError as exc:
            raise ImageError(f"slice {file.name}: missing {str(exc).split()[-1]} (needed to order the slices)") from None
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for broken files
            raise ImageError(f"slice {file.name}: not a readable DICOM slice ({describe(exc, file)})") from None
        slices.append((file.name, ds, pixels, position, orientation))
    first = slices[0]
    for name, _, pixels, _, orientation in slices[1:]:
        if not np.allclose(orientation, first[4], atol=1e-4):
            raise ImageError(f"mixed orientations: slice {name} has ImageOrientationPatient {orientation.tolist()}, "
                             f"slice {first[0]} {first[4].tolist()}")
        if pixels.shape != first[2].shape:
            raise ImageError(f"inconsistent slices: {name} is {'×'.join(map(str, pixels.shape))}, "
                             f"{first[0]} {'×'.join(map(str, first[2].shape))}")
    normal = np.cross(first[4][:3], first[4][3:])
    depth = np.array([float(s[3] @ normal) for s in slices])
    order = np.argsort(depth, kind="stable")
    depth = depth[order]
    steps = np.diff(depth)
    step = float(np.median(steps))
    repeated = np.flatnonzero(steps < 1e-3 * max(step, 1e-3))
    if repeated.size:
        i = int(repeated[0])
        raise ImageError(f"duplicated slice position: {slices[order[i]][0]} and {slices[order[i + 1]][0]} are both at "
                         f"{depth[i]:.3f} mm along the slice normal")
    gaps = np.flatnonzero(steps > GAP_TOLERANCE * step)
    if gaps.size:
        i = int(gaps[0])
        raise ImageError(f"missing slice(s): a gap of {steps[i]:.3f} mm between {slices[order[i]][0]} and "
                         f"{slices[order[i + 1]][0]} where the series steps {step:.3f} mm")
    ds = first[1]
    row_spacing, column_spacing = (float(v) for v in ds.get("PixelSpacing", [1.0, 1.0]))
    spacing = [step, row_spacing, column_spacing]
    _check_spacing(spacing)
    center = window_center if window_center is not None else _first(ds.get("WindowCenter"))
    width = window_width if window_width is not None else _first(ds.get("WindowWidth"))
    volume = window(np.stack([slices[i][2] for i in order]), center, width)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        volume = 255 - volume
    tags = {key: plain(ds.get(key)) for key in WHITELIST if key in ds}
    return volume[..., None], {**tags, "spacing": spacing}


def read_series_patient(folder: Path) -> str | None:
    """A series' PatientID (from its first slice) without decoding pixels."""
    from pipeline.data.dicom import read_patient_id

    files = series_files(folder)
    return read_patient_id(files[0]) if files else None


def window(values: np.ndarray, center: float | None, width: float | None) -> np.ndarray:
    """A LINEAR window (DICOM PS3.3 C.11.2.1.2) to 0..255, or the volume's own min..max without one."""
    if center is not None and width is not None:
        low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    else:
        low, high = float(values.min()), float(values.max())
    scaled = (values.astype(np.float64) - low) / max(high - low, 1e-9)
    return np.rint(np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def preprocess_volume(volume: np.ndarray, spacing: list[float] | None, size: int | None,
                      target_spacing: float | None) -> np.ndarray:
    """D×H×W×C uint8 resampled as ``data.spacing`` and ``data.image_size`` say (see the module's notes)."""
    from scipy.ndimage import zoom

    if target_spacing is not None:
        if spacing is None:
            raise ImageError("data.spacing is set but this volume carries no voxel spacing (e.g. a MedMNIST array)")
        factors = [s / target_spacing for s in spacing]
        volume = _zoom(volume, factors, zoom)
        if size is not None:
            volume = _crop_or_pad(volume, size)
    elif size is not None and volume.shape[:3] != (size,) * 3:
        volume = _zoom(volume, [size / n for n in volume.shape[:3]], zoom)
    return volume


def _zoom(volume: np.ndarray, factors: list[float], zoom: Any) -> np.ndarray:
    if all(abs(f - 1) < 1e-9 for f in factors):
        return volume
    resampled = zoom(volume.astype(np.float32), (*factors, 1), order=1, mode="nearest", grid_mode=True)
    return np.clip(np.rint(resampled), 0, 255).astype(np.uint8)


def _crop_or_pad(volume: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((size, size, size, volume.shape[3]), dtype=volume.dtype)
    source, target = [], []
    for n in volume.shape[:3]:
        if n >= size:
            start = (n - size) // 2
            source.append(slice(start, start + size))
            target.append(slice(0, size))
        else:
            start = (size - n) // 2
            source.append(slice(0, n))
            target.append(slice(start, start + n))
    out[tuple(target)] = volume[tuple(source)]
    return out


def _check_spacing(spacing: list[float]) -> None:
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ImageError(f"the header gives voxel spacing {spacing} mm; every axis needs a positive spacing")


def _first(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value[0])
    except TypeError:
        return float(value)

