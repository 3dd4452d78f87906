"""Simulated scans: the built-in dataset that lets ``dvc repro`` run anywhere.

Each image is a smooth "organ" (a soft-edged ellipse with low-frequency intensity variation
and textured noise) on a dark background. Class 1 ("lesion") carries one soft-edged blob of
varied size, contrast and position inside the organ; its mask is saved so that explanations
can be checked against ground truth. Both classes carry benign look-alikes, small bright
dots and thin vessel-like lines, as bright as the lesion at their peak, so brightness alone
does not separate the classes: a model has to learn the lesion's size and shape.

Generation is deterministic: split ``k`` draws from ``numpy.random.default_rng([seed, k])``,
so the same params and seed give the same bytes.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from pipeline.core.config import PhantomParams
from pipeline.core.dataset import SPLITS

CLASS_NAMES = ("normal", "lesion")


def generate_split(params: PhantomParams, seed: int, split: str) -> dict[str, np.ndarray]:
    """Images (N×H×W×1 uint8), labels (N,), ids (N,), lesion masks (N×H×W uint8), sites (N,)."""
    n = {"train": params.n_train, "val": params.n_val, "test": params.n_test}[split]
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    n_pos = max(1, round(params.prevalence * n))
    labels = np.zeros(n, dtype=np.int64)
    labels[:n_pos] = 1
    rng.shuffle(labels)
    size = params.image_size
    images = np.empty((n, size, size, 1), dtype=np.uint8)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    sites = rng.integers(0, len(params.site_noise), n)
    for i, label in enumerate(labels):
        image, mask = _scan(params, rng, bool(label), params.noise * params.site_noise[sites[i]])
        images[i, :, :, 0] = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
        masks[i] = mask
    ids = np.array([f"phantom-{split}-{i:05d}" for i in range(n)])
    groups = np.array([f"site-{chr(ord('A') + s)}" for s in sites])
    out = {"images": images, "labels": labels, "ids": ids, "masks": masks, "groups": groups}
    if params.shortcut is not None:
        out["markers"] = add_markers(images, labels, params.shortcut if split != "test" else 0.0, rng)
    return out


def marker_box(image_size: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the shortcut marker: a small square in the top-left corner."""
    side = max(2, round(4 * image_size / 64))
    return 2, 2 + side, 2, 2 + side


def add_markers(images: np.ndarray, labels: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Burn a bright marker into images; it follows the label with probability ``strength``.

    With probability ``strength`` an image carries the marker exactly when it has a lesion;
    otherwise the marker is a coin flip. At strength 1 the marker alone predicts the label, at
    0 it carries no information (as in the test split).
    """
    follows = rng.uniform(size=len(labels)) < strength
    coin = rng.uniform(size=len(labels)) < 0.5
    markers = np.where(follows, labels == 1, coin).astype(np.uint8)
    top, bottom, left, right = marker_box(images.shape[1])
    images[markers == 1, top:bottom, left:right, :] = 230
    return markers


def _scan(params: PhantomParams, rng: np.random.Generator, lesion: bool, noise: float) -> tuple[np.ndarray, np.ndarray]:
    size = params.image_size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    organ = _organ(rng, yy, xx, size)
    image = 0.06 + organ * (0.42 + _low_frequency(rng, yy, xx, size))
    texture = gaussian_filter(rng.standard_normal((size, size)), sigma=1.2)
    image += organ * texture * (noise * 2.5)
    for _ in range(rng.poisson(params.lookalikes)):
        cy, cx = _point_inside(rng, organ)
        sigma = rng.uniform(0.6, 1.1)
        image += rng.uniform(0.2, 0.45) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    for _ in range(rng.poisson(params.lookalikes / 2)):
        image += organ * _vessel(rng, yy, xx, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    if lesion:
        cy, cx = _point_inside(rng, organ, margin=0.6)
        radius = rng.uniform(*params.lesion_radius) * size / 64
        contrast = params.lesion_contrast * rng.uniform(0.6, 1.3)
        # Slightly elliptical, soft-edged blob with its own texture.
        stretch = rng.uniform(0.75, 1.3)
        dist = np.sqrt(((yy - cy) * stretch) ** 2 + ((xx - cx) / stretch) ** 2)
        blob = 1.0 / (1.0 + np.exp((dist - radius) / (0.18 * radius)))
        blob *= 1.0 + 0.25 * gaussian_filter(rng.standard_normal((size, size)), sigma=1.0)
        image += contrast * blob
        mask = (dist <= radius).astype(np.uint8)
    image += noise * rng.standard_normal((size, size))
    return np.clip(image, 0.0, 1.0), mask


def _organ(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    cy, cx = size / 2 + rng.normal(0, 0.04 * size, 2)
    ay, ax = size * rng.uniform(0.30, 0.42, 2)
    theta = rng.uniform(0, np.pi)
    y, x = yy - cy, xx - cx
    u = (x * np.cos(theta) + y * np.sin(theta)) / ax
    v = (-x * np.sin(theta) + y * np.cos(theta)) / ay
    dist = np.sqrt(u**2 + v**2)
    return 1.0 / (1.0 + np.exp(-(1.0 - dist) * 12.0))


def _low_frequency(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    field = np.zeros_like(yy)
    for _ in range(3):
        freq = rng.uniform(0.5, 2.0) * 2 * np.pi / size
        angle = rng.uniform(0, 2 * np.pi)
        field += np.cos(freq * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
    return 0.05 * field


def _vessel(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    """A thin curved line: a quadratic Bézier curve drawn with a Gaussian profile."""
    p0, p1, p2 = rng.uniform(0.15 * size, 0.85 * size, (3, 2))
    t = np.linspace(0, 1, 4 * size)[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    canvas = np.zeros((size, size))
    iy = np.clip(np.rint(curve[:, 0]).astype(int), 0, size - 1)
    ix = np.clip(np.rint(curve[:, 1]).astype(int), 0, size - 1)
    canvas[iy, ix] = 1.0
    line = gaussian_filter(canvas, sigma=rng.uniform(0.5, 0.8))
    return rng.uniform(0.15, 0.3) * line / max(line.max(), 1e-9)


def _point_inside(rng: np.random.Generator, organ: np.ndarray, margin: float = 0.5) -> tuple[float, float]:
    """A random point where the organ weight is above ``margin`` (rejection sampling)."""
    size = organ.shape[0]
    for _ in range(1000):
        cy, cx = rng.uniform(0, size, 2)
        if organ[int(cy), int(cx)] > margin:
            return float(cy), float(cx)
    return size / 2, size / 2
