"""Image files to uint8 arrays, and the preprocessing every source shares.

PNG, JPEG and TIFF are read with Pillow (16-bit grayscale is scaled to 8 bits); DICOM with
pydicom (:mod:`pipeline.data.dicom`); volumes, NIfTI files and DICOM series folders, by
:mod:`pipeline.data.volumes` (resampled there, not by :func:`preprocess`). Preprocessing, in order: centre-crop to a square and resize
to ``data.image_size`` (bilinear; skipped when null, and then every image must already have
the same size), then convert to ``data.channels`` (ITU-R 601 luma for RGB → gray, copies for
gray → RGB). Everything is deterministic, so equal inputs give equal bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.dicom import SUFFIX as DICOM_SUFFIX
from pipeline.data.dicom import ImageError, describe, is_dicom, read_dicom
from pipeline.data.volumes import NIFTI_SUFFIXES, is_nifti, preprocess_volume, read_nifti, read_series

_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}
IMAGE_SUFFIXES = tuple(_FORMATS)
SUPPORTED = (*IMAGE_SUFFIXES, DICOM_SUFFIX, *NIFTI_SUFFIXES)


def is_supported(name: str | Path) -> bool:
    """Whether prepare reads a file of this name (``.nii.gz`` counts as one suffix)."""
    return str(name).lower().endswith(SUPPORTED)


def read_file(path: Path, window_center: float | None = None, window_width: float | None = None,
              frames: str = "error") -> tuple[np.ndarray, dict[str, Any]]:
    """H×W×C uint8 (C 1 or 3), or D×H×W×1 for a NIfTI file or a DICOM series folder, and
    whitelisted metadata (DICOM attributes, a volume's voxel spacing); ImageError when unreadable."""
    if path.is_dir():
        return read_series(path, window_center, window_width)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageError(f"cannot open ({exc.strerror})") from None
    if size == 0:
        raise ImageError("empty file (0 bytes)")
    if is_dicom(path):
        return read_dicom(path, window_center, window_width, frames)
    if is_nifti(path):
        return read_nifti(path, window_center, window_width)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ImageError(f"not an image file (suffix '{path.suffix}'; supported: {', '.join(SUPPORTED)})")
    from PIL import Image, UnidentifiedImageError

    try:
        try:  # the suffix's decoder first (skips Pillow's format sniffing), then any that fits
            image = Image.open(path, formats=[_FORMATS[path.suffix.lower()]])
        except UnidentifiedImageError:
            image = Image.open(path)
        with image:
            image.load()
            return _to_array(image), {}
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"not a readable image ({describe(exc, path)})") from None


def _to_array(image: Any) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.float64)
        return np.rint(np.clip(values, 0, 65535) / 257).astype(np.uint8)[..., None]
    if image.mode == "L":
        return np.asarray(image, dtype=np.uint8)[..., None]
    if image.mode in ("P", "1", "LA"):
        return np.asarray(image.convert("L"), dtype=np.uint8)[..., None]
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def preprocess(image: np.ndarray, size: int | None, channels: int | None, spacing: list[float] | None = None,
               target_spacing: float | None = None) -> np.ndarray:
    """Centre-crop + resize to ``size`` (when set), then convert to ``channels`` (when set).

    Volumes (D×H×W×C) are resampled by :func:`pipeline.data.volumes.preprocess_volume` from
    their voxel ``spacing`` (mm, when known) to ``target_spacing`` and ``size``.
    """
    from PIL import Image

    if image.ndim == 4:
        image = preprocess_volume(image, spacing, size, target_spacing)
        return np.repeat(image, 3, axis=3) if channels == 3 and image.shape[3] == 1 else image
    if size is not None and image.shape[:2] != (size, size):
        h, w = image.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = image[top:top + side, left:left + side]
        pil = Image.fromarray(square[..., 0] if square.shape[2] == 1 else square)
        image = np.asarray(pil.resize((size, size), Image.BILINEAR), dtype=np.uint8)
        image = image[..., None] if image.ndim == 2 else image
    if channels == 1 and image.shape[2] == 3:
        image = np.asarray(Image.fromarray(image).convert("L"), dtype=np.uint8)[..., None]
    elif channels == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return image


def resize_mask(mask: np.ndarray, size: int | None) -> np.ndarray:
    """Nearest-neighbour, matching :func:`preprocess`'s crop, so masks stay binary and aligned."""
    from PIL import Image

    if size is None or mask.shape == (size,) * mask.ndim:
        return mask
    if mask.ndim == 3:  # a volume's mask (the phantom's), resampled as the volume is
        from scipy.ndimage import zoom

        return zoom(mask, [size / n for n in mask.shape], order=0, mode="nearest", grid_mode=True)
    h, w = mask.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(mask[top:top + side, left:left + side])
    return np.asarray(square.resize((size, size), Image.NEAREST), dtype=np.uint8)
