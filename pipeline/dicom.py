"""DICOM pixels to uint8, and the only DICOM attributes ever written anywhere.

Pixel values go through the modality LUT (RescaleSlope/RescaleIntercept), then a window
(``data.dicom.window_center``/``window_width`` when set, else the file's first
WindowCenter/WindowWidth, else the image's own min..max) mapped to 0..255; MONOCHROME1
images are inverted so that bright means dense everywhere. Multi-frame files are an error
unless ``data.dicom.frames: first``.

Privacy: only the attributes in ``WHITELIST`` leave this module (plus the patient id, which
prepare pseudonymises at once). Names, dates, accession numbers and every other tag stay in
the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

WHITELIST = ("Modality", "Rows", "Columns", "PixelSpacing", "PhotometricInterpretation", "BitsStored")


class ImageError(Exception):
    """A file that cannot become an image; the message says why (without the file name)."""


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
        raise ImageError(f"cannot decode DICOM pixel data ({type(exc).__name__}: {exc})") from None
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames > 1:
        if frames != "first":
            raise ImageError(f"multi-frame DICOM ({n_frames} frames); set data.dicom.frames: first to use frame 1")
        pixels = pixels[0]
    tags = {key: _plain(ds.get(key)) for key in WHITELIST if key in ds}
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        return np.asarray(pixels, dtype=np.uint8), tags
    values = pixels.astype(np.float64) * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    center = window_center if window_center is not None else _first(ds.get("WindowCenter"))
    width = window_width if window_width is not None else _first(ds.get("WindowWidth"))
    if center is None or width is None or width <= 0:
        low, high = float(values.min()), float(values.max())
    else:
        low, high = center - width / 2, center + width / 2
    image = np.rint(np.clip((values - low) / max(high - low, 1e-9), 0, 1) * 255).astype(np.uint8)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        image = 255 - image
    return image[..., None], tags


def _first(value: Any) -> float | None:
    """The first of a multi-valued DICOM number (WindowCenter may hold several), as float."""
    if value is not None and hasattr(value, "__len__") and not isinstance(value, (str, bytes)):
        value = value[0] if len(value) else None
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _plain(value: Any) -> Any:
    if isinstance(value, (int, float, str)):
        return value
    try:
        return [float(v) for v in value]
    except TypeError:
        return str(value)
