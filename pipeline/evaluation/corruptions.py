"""Image corruptions for the robustness benchmark, in the spirit of MedMNIST-C (Di Salvo et al. 2024).

Accuracy on a clean test split says little about a scan from another scanner, another
protocol or another compression setting. Each corruption here is one such shift, at three
severities (1 mild … 3 strong; 0 leaves the image as it is), applied to N×H×W×C uint8 images
and returning uint8 of the same shape. Random corruptions draw from the generator they are
given, so a seeded evaluation corrupts the same way every run. Sizes are relative to the
image side, so a severity means the same on 28 px and 224 px images.

Volumes (N×D×H×W×C) take the same corruptions: noise, contrast, brightness and gamma per
voxel, blur in all three axes, pixelation in-plane (each axial slice, as a thick-slice
protocol coarsens them), and JPEG on each volume's axial slices stacked into one tall image:
one encode per volume rather than per slice, and, when the slice height is a multiple of
JPEG's 8-pixel blocks, exactly the bytes of slice-by-slice compression (no block straddles
two slices).

Everything but JPEG is array arithmetic on the whole batch (float32; brightness and gamma as
256-entry lookup tables), never a loop over pictures: a 3-D test split is 20 million voxels
per corruption and severity.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

Corruption = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


def _clip(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def gaussian_noise(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise of standard deviation ``sigma`` grey levels (sensor noise, low dose)."""
    return _clip(images + sigma * rng.standard_normal(images.shape, dtype=np.float32))


def blur(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur of standard deviation ``sigma`` × the image side / 64 pixels (defocus, motion)."""
    from scipy.ndimage import gaussian_filter

    pixels = sigma * images.shape[1] / 64
    spatial = (pixels,) * (images.ndim - 2)
    return _clip(gaussian_filter(images.astype(np.float32), sigma=(0, *spatial, 0), mode="nearest"))


def contrast(images: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Contrast scaled by ``factor`` around each image's mean (another window, another detector)."""
    mean = images.mean(axis=tuple(range(1, images.ndim)), keepdims=True, dtype=np.float64).astype(np.float32)
    return _clip(mean + (images - mean) * np.float32(factor))


def brightness(images: np.ndarray, shift: float, rng: np.random.Generator) -> np.ndarray:
    """Every pixel brighter by ``shift`` grey levels (exposure, calibration)."""
    return _clip(np.arange(256.0) + shift)[images]


def gamma(images: np.ndarray, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Gamma ``exponent`` on [0, 1] intensities (another transfer curve)."""
    return _clip(255.0 * (np.arange(256.0) / 255.0) ** exponent)[images]


def jpeg(images: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    """JPEG compression at ``quality`` (Pillow's 1–95 scale), as archives and PACS exports do."""
    if images.ndim == 5:  # volumes: each one's axial slices as one tall image
        n, depth, height = images.shape[:3]
        stacked = images.reshape(n, depth * height, *images.shape[3:])
        return jpeg(stacked, quality, rng).reshape(images.shape)

    def compress(picture: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=int(quality))
        return Image.open(buffer)
    return _each_picture(images, compress)


def pixelate(images: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Down-sampled in-plane to ``scale`` × the side (each pixel the area-weighted mean of what it
    covers) and back (nearest): a coarser acquisition."""
    height, width = images.shape[-3:-1]
    rows, cols = _area_weights(height, max(1, round(height * scale))), _area_weights(width, max(1, round(width * scale)))
    small = _clip(np.einsum("ah,...hwc,bw->...abc", rows, images.astype(np.float32), cols, optimize=True))
    return small[..., _nearest(len(rows), height), :, :][..., _nearest(len(cols), width), :]


def _area_weights(size: int, smaller: int) -> np.ndarray:
    """``smaller``×``size`` matrix: row ``a`` averages the input pixels under output pixel ``a``,
    each weighted by the fraction of it that the output pixel covers."""
    edges = np.arange(smaller + 1) * size / smaller
    pixel = np.arange(size)
    cover = np.minimum(edges[1:, None], pixel + 1) - np.maximum(edges[:-1, None], pixel)
    cover = np.clip(cover, 0, None)
    return (cover / cover.sum(axis=1, keepdims=True)).astype(np.float32)


def _nearest(smaller: int, size: int) -> np.ndarray:
    """For each of ``size`` output pixels, the one of ``smaller`` whose area holds its centre."""
    return np.minimum(((np.arange(size) + 0.5) * smaller / size).astype(int), smaller - 1)


def _each_picture(images: np.ndarray, change: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    """N×H×W×C uint8 images, each passed through Pillow as a grayscale or RGB picture."""
    out = np.empty_like(images)
    for i, image in enumerate(images):
        changed = np.asarray(change(Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)))
        out[i] = changed[..., None] if changed.ndim == 2 else changed
    return out


# Corruption and its parameter at severities 1, 2, 3 (evaluate.corruptions names them).
CORRUPTIONS: dict[str, tuple[Corruption, tuple[float, float, float]]] = {
    "gaussian_noise": (gaussian_noise, (8.0, 16.0, 32.0)),
    "blur": (blur, (1.0, 2.0, 3.0)),
    "contrast": (contrast, (0.7, 0.5, 0.3)),
    "brightness": (brightness, (20.0, 40.0, 70.0)),
    "gamma": (gamma, (1.5, 2.0, 3.0)),
    "jpeg": (jpeg, (50.0, 25.0, 10.0)),
    "pixelate": (pixelate, (0.75, 0.5, 0.3)),
}


def corrupt(images: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """``images`` under corruption ``name`` at ``severity`` (0: unchanged)."""
    if severity == 0:
        return images
    function, levels = CORRUPTIONS[name]
    return function(images, levels[severity - 1], rng)
