"""Simulated scans: the built-in dataset that lets ``dvc repro`` run anywhere.

Each image is a smooth "organ" (a soft-edged ellipse with low-frequency intensity variation
and textured noise) on a dark background. Class 1 ("lesion") carries one soft-edged blob of
varied size, contrast and position inside the organ; its mask is saved so that explanations
can be checked against ground truth. Both classes carry benign look-alikes, small bright
dots and thin vessel-like lines, as bright as the lesion at their peak, so brightness alone
does not separate the classes: a model has to learn the lesion's size and shape.

``task: multilabel`` draws three findings of different shapes, each with its own
prevalence and independent of the others (so they co-occur): a **nodule** (a small round
blob, like the binary lesion), a **consolidation** (a large, faint, diffuse patch) and a
**calcification** (a tight cluster of tiny, very bright dots, unlike the scattered single
look-alike dots). The mask is a label map: pixel value k + 1 where finding k lies, each
finding placed apart from the others. ``task: ordinal`` grades each scan 0-3 by the size of
its lesion (grade 0: none; grades 1-3: the lesion radius range cut into three bands, with a
gap between bands), as severity scores grade lesion size.

With ``ndim: 3`` the scans are volumes built from the same idea: a soft ellipsoid organ with
smooth variation and textured noise, a near-spherical lesion with its 3-D mask, benign dots
and curved vessel-like tubes, two scanner sites and the optional shortcut marker (a cube in
the corner). Sizes are given at a reference side (64 px for images, 32 voxels for volumes)
and scale with ``image_size``.

Generation is deterministic: split ``k`` draws from ``numpy.random.default_rng([seed, k])``,
so the same params and seed give the same bytes. Volumes cost about 30 times an image, so each
volume ``i`` draws from its own stream, ``default_rng([seed, k, i])``, and they are generated
in parallel processes (one per core, at most 8): the bytes do not depend on how many.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from pipeline.core.config import PhantomParams
from pipeline.core.dataset import SPLITS, marker_region

CLASS_NAMES = ("normal", "lesion")
FINDINGS = ("nodule", "consolidation", "calcification")
# Each finding's prevalence as a multiple of data.phantom.prevalence (0.3, 0.2, 0.15 by default).
FINDING_PREVALENCE = (1.5, 1.0, 0.75)
GRADES = ("grade 0", "grade 1", "grade 2", "grade 3")
# Share of scans per grade: grade 0 (no lesion) 1 - 2 x prevalence, the rest alike.
BAND_GAP = 0.1  # of each radius band, left out at both of its ends


def class_names(params: PhantomParams) -> tuple[str, ...]:
    """The phantom's labels: normal/lesion, its three findings, or its four grades."""
    return {"binary": CLASS_NAMES, "multilabel": FINDINGS, "ordinal": GRADES}[params.task]


def _labels(params: PhantomParams, n: int, rng: np.random.Generator) -> np.ndarray:
    """Binary: exactly round(prevalence x n) lesions, shuffled. Multi-label: N×3, each finding
    drawn on its own at its prevalence. Ordinal: grades with exact counts per grade, shuffled."""
    if params.task == "multilabel":
        rates = np.minimum(np.asarray(FINDING_PREVALENCE) * params.prevalence, 0.9)
        return (rng.uniform(size=(n, len(FINDINGS))) < rates).astype(np.int64)
    if params.task == "ordinal":
        lesions = min(max(3, round(2 * params.prevalence * n)), n - 1)
        labels = np.zeros(n, dtype=np.int64)
        labels[:lesions] = 1 + np.arange(lesions) % (len(GRADES) - 1)
        rng.shuffle(labels)
        return labels
    n_pos = max(1, round(params.prevalence * n))
    labels = np.zeros(n, dtype=np.int64)
    labels[:n_pos] = 1
    rng.shuffle(labels)
    return labels


def grade_radius(params: PhantomParams, grade: int) -> tuple[float, float]:
    """The radius band of an ordinal grade (1-3): a third of ``lesion_radius``, less the gaps."""
    low, high = params.lesion_radius
    width = (high - low) / (len(GRADES) - 1)
    start = low + (grade - 1) * width
    return start + BAND_GAP * width, start + (1 - BAND_GAP) * width
REFERENCE_SIZE = {2: 64, 3: 32}  # side at which lesion_radius is given, and the default image_size


def side(params: PhantomParams) -> int:
    return params.image_size or REFERENCE_SIZE[params.ndim]


def generate_split(params: PhantomParams, seed: int, split: str) -> dict[str, np.ndarray]:
    """Images (N×H×W×1 uint8; volumes N×D×H×W×1), labels (N, or N×3 for multi-label), ids (N,),
    lesion masks (N×H×W or N×D×H×W uint8; multi-label: finding k + 1), sites (N,)."""
    n = {"train": params.n_train, "val": params.n_val, "test": params.n_test}[split]
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    labels = _labels(params, n, rng)
    size = side(params)
    shape = (size,) * params.ndim
    images = np.empty((n, *shape, 1), dtype=np.uint8)
    masks = np.zeros((n, *shape), dtype=np.uint8)
    sites = rng.integers(0, len(params.site_noise), n)
    noise = params.noise * np.asarray(params.site_noise)[sites]
    if params.task == "multilabel":
        scans = (_scan(params, rng, False, noise[i], findings=np.flatnonzero(label)) for i, label in enumerate(labels))
    elif params.task == "ordinal":
        scans = (_scan(params, rng, bool(label), noise[i], grade_radius(params, label) if label else None)
                 for i, label in enumerate(labels))
    elif params.ndim == 2:
        scans = (_scan(params, rng, bool(label), noise[i]) for i, label in enumerate(labels))
    else:
        scans = _volumes([(params, [seed, SPLITS.index(split), i], bool(label), noise[i]) for i, label in enumerate(labels)])
    for i, (image, mask) in enumerate(tqdm(scans, total=n, desc=f"phantom {split}", leave=False, disable=None)):
        images[i, ..., 0] = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
        masks[i] = mask
    ids = np.array([f"phantom-{split}-{i:05d}" for i in range(n)])
    groups = np.array([f"site-{chr(ord('A') + s)}" for s in sites])
    out = {"images": images, "labels": labels, "ids": ids, "masks": masks, "groups": groups}
    if params.shortcut is not None:
        present = labels.max(axis=1) if labels.ndim == 2 else np.minimum(labels, 1)  # any finding, any grade
        out["markers"] = add_markers(images, present, params.shortcut if split != "test" else 0.0, rng)
    return out


def marker_box(image_size: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the shortcut marker: a small square in the top-left corner
    (in a volume, a cube spanning ``top:bottom`` in depth as well)."""
    edge = max(2, round(4 * image_size / 64))
    return 2, 2 + edge, 2, 2 + edge


def add_markers(images: np.ndarray, labels: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Burn a bright marker into images; it follows the label with probability ``strength``.

    With probability ``strength`` an image carries the marker exactly when it has a lesion;
    otherwise the marker is a coin flip. At strength 1 the marker alone predicts the label, at
    0 it carries no information (as in the test split).
    """
    follows = rng.uniform(size=len(labels)) < strength
    coin = rng.uniform(size=len(labels)) < 0.5
    markers = np.where(follows, labels == 1, coin).astype(np.uint8)
    region = marker_region(marker_box(images.shape[1]), images.shape[1:-1])
    for i in np.flatnonzero(markers):
        images[i][region] = 230
    return markers


def _scan(params: PhantomParams, rng: np.random.Generator, lesion: bool, noise: float,
          radius: tuple[float, float] | None = None, findings: np.ndarray = ()) -> tuple[np.ndarray, np.ndarray]:
    """One image and its mask: the organ, look-alikes, then the lesion (radius drawn from
    ``radius``, default ``lesion_radius``) or the multi-label ``findings``."""
    size = side(params)
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
        radius = rng.uniform(*(radius or params.lesion_radius)) * size / 64
        contrast = params.lesion_contrast * rng.uniform(0.6, 1.3)
        # Slightly elliptical, soft-edged blob with its own texture.
        stretch = rng.uniform(0.75, 1.3)
        dist = np.sqrt(((yy - cy) * stretch) ** 2 + ((xx - cx) / stretch) ** 2)
        blob = 1.0 / (1.0 + np.exp((dist - radius) / (0.18 * radius)))
        blob *= 1.0 + 0.25 * gaussian_filter(rng.standard_normal((size, size)), sigma=1.0)
        image += contrast * blob
        mask = (dist <= radius).astype(np.uint8)
    taken: list[tuple[float, float, float]] = []  # centres and reach of the findings placed so far
    for finding in findings:
        found, (cy, cx), reach = _finding(params, rng, organ, yy, xx, size, int(finding), taken)
        image += found
        taken.append((cy, cx, reach))
        mask[(found > 0.5 * found.max()) & (mask == 0)] = finding + 1
    image += noise * rng.standard_normal((size, size))
    return np.clip(image, 0.0, 1.0), mask


def _finding(params: PhantomParams, rng: np.random.Generator, organ: np.ndarray, yy: np.ndarray, xx: np.ndarray,
             size: int, kind: int, taken: list[tuple[float, float, float]]
             ) -> tuple[np.ndarray, tuple[float, float], float]:
    """The intensity added by one multi-label finding, its centre and its reach (pixels), at a
    point of the organ clear of the findings already placed."""
    scale = size / 64
    reach = (4.5, 9.0, 4.0)[kind] * scale
    for _ in range(50):
        cy, cx = _point_inside(rng, organ, margin=0.6)
        if all(np.hypot(cy - y, cx - x) > reach + r for y, x, r in taken):
            break
    contrast = params.lesion_contrast * rng.uniform(0.8, 1.2)
    if kind == 0:  # nodule: a small, sharp, round blob
        radius = rng.uniform(2.5, 4.0) * scale
        dist = np.hypot(yy - cy, xx - cx)
        return contrast / (1.0 + np.exp((dist - radius) / (0.15 * radius))), (cy, cx), reach
    if kind == 1:  # consolidation: a large, elongated patch of raised density with a soft edge
        sy, sx = rng.uniform(5.0, 8.0, 2) * scale
        radius = np.sqrt((yy - cy) ** 2 / sy**2 + (xx - cx) ** 2 / sx**2)
        return 0.8 * contrast * organ / (1.0 + np.exp((radius - 1.0) / 0.12)), (cy, cx), reach
    # calcification: 3-5 tiny, very bright dots within a few pixels of each other
    dots = np.zeros_like(yy)
    for _ in range(rng.integers(3, 6)):
        dy, dx = rng.uniform(-2.5, 2.5, 2) * scale
        dots += np.exp(-((yy - cy - dy) ** 2 + (xx - cx - dx) ** 2) / (2 * (0.6 * scale) ** 2))
    return 2.4 * contrast * np.minimum(dots, 1.0), (cy, cx), reach


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


def _volumes(jobs: list[tuple[PhantomParams, list[int], bool, float]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """:func:`_seeded_volume` for each job, in order: by a process per core (at most 8) from 64 on."""
    if len(jobs) < 64:
        yield from map(_seeded_volume, jobs)
        return
    with ProcessPoolExecutor(min(len(os.sched_getaffinity(0)), 8)) as pool:
        yield from pool.map(_seeded_volume, jobs, chunksize=16)


def _seeded_volume(job: tuple[PhantomParams, list[int], bool, float]) -> tuple[np.ndarray, np.ndarray]:
    params, stream, lesion, noise = job
    return _volume(params, np.random.default_rng(stream), lesion, noise)


def _volume(params: PhantomParams, rng: np.random.Generator, lesion: bool, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """One 3-D scan and its lesion mask: :func:`_scan`'s recipe in a volume."""
    size = side(params)
    scale = size / REFERENCE_SIZE[3]
    grid = _grid(size)
    organ = _ellipsoid(rng, grid, size)
    field = sum(np.cos(rng.uniform(0.5, 2.0) * 2 * np.pi / size * np.tensordot(_direction(rng).astype(np.float32), grid, 1)
                       + rng.uniform(0, 2 * np.pi)) for _ in range(3))
    volume = 0.06 + organ * (0.42 + 0.05 * field)
    volume += organ * gaussian_filter(rng.standard_normal(grid.shape[1:], dtype=np.float32), sigma=1.2 * scale) * (noise * 2.5)
    for _ in range(rng.poisson(params.lookalikes)):
        centre = _voxel_inside(rng, organ)
        sigma = rng.uniform(0.6, 1.1) * scale
        volume += rng.uniform(0.2, 0.45) * np.exp(-_squared_distance(grid, centre) / (2 * sigma**2))
    for _ in range(rng.poisson(params.lookalikes / 2)):
        volume += organ * _tube(rng, size, scale)
    mask = np.zeros(grid.shape[1:], dtype=np.uint8)
    if lesion:
        centre = _voxel_inside(rng, organ, margin=0.6)
        radius = rng.uniform(*params.lesion_radius) * scale
        contrast = params.lesion_contrast * rng.uniform(0.6, 1.3)
        stretch = rng.uniform(0.8, 1.25, 3).astype(grid.dtype)  # slightly ellipsoidal
        centre = centre.astype(grid.dtype)
        dist = np.sqrt(sum(((grid[a] - centre[a]) * stretch[a]) ** 2 for a in range(3)))
        blob = 1.0 / (1.0 + np.exp((dist - radius) / (0.18 * radius)))
        blob *= 1.0 + 0.25 * gaussian_filter(rng.standard_normal(grid.shape[1:], dtype=np.float32), sigma=1.0)
        volume += contrast * blob
        mask = (dist <= radius).astype(np.uint8)
    volume += noise * rng.standard_normal(grid.shape[1:], dtype=np.float32)
    return np.clip(volume, 0.0, 1.0), mask


@functools.cache
def _grid(size: int) -> np.ndarray:
    """3×D×H×W voxel coordinates (float32, read-only, shared by every volume of this size); volumes
    are computed in float32, half the memory traffic of float64, for values stored as uint8."""
    grid = np.stack(np.mgrid[0:size, 0:size, 0:size].astype(np.float32))
    grid.flags.writeable = False
    return grid


def _direction(rng: np.random.Generator) -> np.ndarray:
    vector = rng.standard_normal(3)
    return vector / np.linalg.norm(vector)


def _squared_distance(grid: np.ndarray, centre: np.ndarray) -> np.ndarray:
    centre = centre.astype(grid.dtype)
    return sum((grid[a] - centre[a]) ** 2 for a in range(len(centre)))


def _ellipsoid(rng: np.random.Generator, grid: np.ndarray, size: int) -> np.ndarray:
    """A soft-edged ellipsoid near the centre, with random semi-axes and a random orientation."""
    centre = (size / 2 + rng.normal(0, 0.04 * size, 3)).astype(grid.dtype)
    axes = (size * rng.uniform(0.30, 0.42, 3)).astype(grid.dtype)
    rotation, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    local = np.tensordot(rotation.T.astype(grid.dtype), grid - centre[:, None, None, None], 1)
    dist = np.sqrt(sum((local[a] / axes[a]) ** 2 for a in range(3)))
    return 1.0 / (1.0 + np.exp(-(1.0 - dist) * 12.0))


def _tube(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """A thin curved tube: a quadratic Bézier curve in 3-D drawn with a Gaussian profile."""
    p0, p1, p2 = rng.uniform(0.15 * size, 0.85 * size, (3, 3))
    t = np.linspace(0, 1, 4 * size)[:, None]
    curve = np.clip(np.rint((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2).astype(int), 0, size - 1)
    sigma = rng.uniform(0.5, 0.8) * scale
    # Filter only the curve's bounding box, grown by the kernel's reach (scipy's default
    # truncation, 4 sigma): the rest of the volume stays exactly zero, at a fraction of the cost.
    reach = int(4 * sigma + 0.5) + 1
    low, high = np.maximum(curve.min(0) - reach, 0), np.minimum(curve.max(0) + reach + 1, size)
    box = tuple(slice(a, b) for a, b in zip(low, high))
    canvas = np.zeros(tuple(high - low))
    canvas[tuple((curve - low).T)] = 1.0
    tube = np.zeros((size, size, size), dtype=np.float32)
    tube[box] = gaussian_filter(canvas, sigma=sigma, mode="constant")
    return rng.uniform(0.15, 0.3) * tube / max(tube.max(), 1e-9)


def _voxel_inside(rng: np.random.Generator, organ: np.ndarray, margin: float = 0.5) -> np.ndarray:
    """A random point where the organ weight is above ``margin`` (rejection sampling)."""
    size = organ.shape[0]
    for _ in range(1000):
        point = rng.uniform(0, size, 3)
        if organ[tuple(point.astype(int))] > margin:
            return point
    return np.full(3, size / 2)
