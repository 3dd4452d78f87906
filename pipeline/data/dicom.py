"""DICOM pixels to uint8, and the only DICOM attributes ever written anywhere.

Pixel values go through pydicom's own implementation of the standard's pipeline (PS3.3
C.11): the modality LUT (``apply_modality_lut``: a Modality LUT Sequence or
RescaleSlope/RescaleIntercept), then the VOI transform (``apply_voi_lut``: the file's VOI LUT
Sequence or its first WindowCenter/WindowWidth, with the file's VOILUTFunction: LINEAR,
LINEAR_EXACT or SIGMOID). ``data.dicom.window_center``/``window_width`` override the file's
VOI with a LINEAR window; a file with neither is shown from its own min to max. The VOI
output range is mapped to 0..255, and MONOCHROME1 images are inverted so that bright means
dense everywhere. Multi-frame files are an error unless ``data.dicom.frames: first``.

Privacy: only the attributes in ``WHITELIST`` leave this module (plus the patient id, which
prepare pseudonymises at once). Names, dates, accession numbers and every other tag stay in
the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

WHITELIST = ("Modality", "Rows", "Columns", "PixelSpacing", "PhotometricInterpretation", "BitsStored")
# What pydicom's VOI functions read: copied into a small dataset when the window is overridden.
_VOI_INPUTS = ("PhotometricInterpretation", "BitsStored", "PixelRepresentation", "RescaleSlope", "RescaleIntercept",
               "ModalityLUTSequence")
_FAR = 1e30  # beyond any stored value: the VOI maps it to the ends of its output range


SUFFIX = ".dcm"


def is_dicom(name: str | Path) -> bool:
    """Whether a file is read as DICOM (by its ``.dcm`` suffix, any case)."""
    return str(name).lower().endswith(SUFFIX)


class ImageError(Exception):
    """A file that cannot become an image; the message says why (without the file name)."""


def describe(exc: Exception, path: Path) -> str:
    """``exc`` as text for an :class:`ImageError`, with the file's path and name taken out: a file
    name may carry a patient's name, and these reasons reach summaries and prediction rows."""
    text = str(exc)
    for name in (str(path), str(Path(path).resolve()), Path(path).name):
        text = text.replace(name, "the file")
    return f"{type(exc).__name__}: {text}"


def read_patient_id(path: Path) -> str | None:
    """PatientID without decoding pixels (for grouping before the images are read)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for broken files
        raise ImageError(f"not a readable DICOM file ({type(exc).__name__})") from None
    value = str(ds.get("PatientID", "")).strip()
    return value or None


def read_dicom(path: Path, window_center: float | None, window_width: float | None,
               frames: str) -> tuple[np.ndarray, dict[str, Any]]:
    """H×W×C uint8 pixels and the whitelisted attributes."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001
        raise ImageError(f"not a readable DICOM file ({type(exc).__name__})") from None
    if "PixelData" not in ds:
        raise ImageError("DICOM file without pixel data")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - missing decoders, truncated data
        raise ImageError(f"cannot decode DICOM pixel data ({describe(exc, path)})") from None
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames > 1:
        if frames != "first":
            raise ImageError(f"multi-frame DICOM ({n_frames} frames); set data.dicom.frames: first to use frame 1")
        pixels = pixels[0]
    tags = {key: plain(ds.get(key)) for key in WHITELIST if key in ds}
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        return np.asarray(pixels, dtype=np.uint8), tags
    try:
        image = to_uint8(ds, pixels, window_center, window_width)
    except (ValueError, AttributeError, KeyError) as exc:  # an invalid LUT or window, or its attributes missing
        raise ImageError(f"cannot apply the DICOM modality/VOI transform ({describe(exc, path)})") from None
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        image = 255 - image
    return image[..., None], tags


def to_uint8(ds: Any, pixels: np.ndarray, window_center: float | None, window_width: float | None) -> np.ndarray:
    """Modality LUT, then VOI (the file's, or the given LINEAR window), scaled to 0..255."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(pixels, ds)
    if values.dtype.kind == "f" and np.array_equal(values, np.rint(values)):
        values = values.astype(np.int64)  # integral after rescale (CT): a VOI LUT indexes integers
    voi = ds
    if window_center is not None and window_width is not None:
        voi = Dataset()
        for key in _VOI_INPUTS:
            if key in ds:
                setattr(voi, key, ds[key].value)
        voi.WindowCenter, voi.WindowWidth = window_center, window_width
    shown = apply_voi_lut(values, voi, prefer_lut=voi is ds)
    lut = voi.get("VOILUTSequence") if voi is ds else None
    if shown is values:  # the file has no VOI LUT or window: show its own range
        low, high = float(values.min()), float(values.max())
    elif lut and lut[0].get("LUTDescriptor") and lut[0].get("LUTData") is not None:
        low, high = 0.0, float(2 ** int(lut[0].LUTDescriptor[2]) - 1)  # a LUT's output range is set by its bit depth
    else:
        with np.errstate(over="ignore"):  # a window is monotone: its ends are where far values land (SIGMOID's exp overflows)
            low, high = (float(v) for v in apply_voi_lut(np.array([-_FAR, _FAR]), voi, prefer_lut=False))
    values = shown.astype(np.float64)
    return np.rint(np.clip((values - low) / max(high - low, 1e-9), 0, 1) * 255).astype(np.uint8)


def plain(value: Any) -> Any:
    """An attribute's value as JSON can hold it."""
    if isinstance(value, (int, float, str)):
        return value
    try:
        return [float(v) for v in value]
    except TypeError:
        return str(value)
