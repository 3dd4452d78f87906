"""The one path every image takes from a source to prepared arrays, for the development data
(:mod:`pipeline.prepare`) and for each external validation site (:mod:`pipeline.data.external`)
alike: decode, preprocess (crop/resize, channels), hash, duplicate policy, then append to its
split's ``.npy`` array on disk (streamed, so a 50k-image folder never sits in memory).

All problems of one kind are reported together in one error naming the first 10 files.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.core.config import DataParams
from pipeline.core.dataset import array_path
from pipeline.core.errors import PipelineError
from pipeline.core.files import NpyWriter, rounded, save_npy
from pipeline.data.dicom import ImageError
from pipeline.data.images import preprocess, resize_mask
from pipeline.data.records import fail
from pipeline.data.sources import Item, Source


def image_digest(image: np.ndarray) -> str:
    """sha256 of one prepared image's bytes: what makes two images exact duplicates."""
    return hashlib.sha256(np.asarray(image).tobytes()).hexdigest()


def write_splits(source: Source, data: DataParams, out: Path) -> dict[str, Any]:
    """Decode, preprocess, check and stream every item to ``out``; returns the checks' findings."""
    shape: tuple[int, ...] | None = None
    first_where = ""
    seen: dict[str, tuple[str, str]] = {}
    unreadable, mismatched, duplicates = [], [], []
    skipped, stats, tags_seen = list(source.skipped), {}, Counter()
    original_sizes, resized, converted = Counter(), 0, 0
    for split in source.splits:  # train, val, test (an external site: one split)
        writer, rows, total, total_sq = None, [], 0.0, 0.0
        for item in tqdm(source.splits[split], desc=f"prepare {split}", leave=False, disable=None):
            try:
                image, tags = item.load()
                before = image.shape
                image = preprocess(image, data.image_size, data.channels, tags.get("spacing"), data.spacing)
            except ImageError as exc:
                unreadable.append(f"{item.where} ({exc})")
                skipped.append({"id": item.id, "reason": str(exc)})
                continue
            original_sizes[dims(before)] += 1
            resized += before[:-1] != image.shape[:-1]
            converted += before[-1] != image.shape[-1]
            if shape is None:
                shape, first_where = image.shape, item.where
            if image.shape != shape:
                kind = "" if image.ndim == len(shape) else f", {'a volume among images' if image.ndim == 4 else 'a 2-D image among volumes'}"
                mismatched.append(f"{item.where} is {dims(image.shape)}{kind}")
                continue
            digest = image_digest(image)
            if digest in seen:
                duplicates.append({"split": split, "id": item.id, "duplicate_of_split": seen[digest][0],
                                   "duplicate_of": seen[digest][1], "where": item.where})
                if data.duplicates == "drop":
                    continue
            seen.setdefault(digest, (split, item.id))
            writer = writer or NpyWriter(array_path(out, split, "images"), np.uint8, shape)
            writer.append(image)
            total, total_sq = total + float(image.sum(dtype=np.float64)), total_sq + float(np.square(image, dtype=np.float64).sum())
            rows.append(item)
            tags_seen.update(f"{k}={v}" for k, v in tags.items() if k in ("Modality", "PhotometricInterpretation"))
        if writer is not None:
            writer.close()
        stats[split] = write_columns(out, split, rows, data.image_size, total, total_sq, shape)
    if data.on_error != "skip":
        fail(data.path, "cannot read (data.on_error: skip skips them)", unreadable)
    fail(data.path, f"image size differs from the first image ({first_where}: {dims(shape or ())}) and "
                    "data.image_size is null", mismatched)
    if data.duplicates == "error":
        fail(data.path, "exact duplicate image (data.duplicates: warn or drop)",
             [f"{d['where']} = {d['duplicate_of_split']}:{d['duplicate_of']}" for d in duplicates])
    for split in source.splits:
        if stats[split]["n"] == 0:
            raise PipelineError(f"{data.path or data.source}: split '{split}' is empty "
                                "(too few images or patients for data.split, or every image was skipped)")
    preprocessing = {**preprocessing_settings(data), "resized": resized, "channels_converted": converted,
                     "original_sizes": dict(sorted(original_sizes.items()))}
    return {"stats": stats, "unreadable": skipped, "duplicates": duplicates, "dicom": dict(sorted(tags_seen.items())),
            "preprocessing": preprocessing}


def write_columns(out: Path, split: str, rows: list[Item], size: int | None, total: float, total_sq: float,
                   shape: tuple[int, ...] | None) -> dict[str, Any]:
    save_npy(array_path(out, split, "labels"), np.array([r.label for r in rows], dtype=np.int64))
    save_npy(array_path(out, split, "ids"), np.array([r.id for r in rows], dtype=str))
    if rows and all(r.mask is not None for r in rows):
        save_npy(array_path(out, split, "masks"), np.stack([resize_mask(r.mask, size) for r in rows]))
    if rows and all(r.group for r in rows):
        save_npy(array_path(out, split, "groups"), np.array([r.group for r in rows], dtype=str))
    if rows and all(r.patient for r in rows):
        save_npy(array_path(out, split, "patients"), np.array([r.patient for r in rows], dtype=str))
    if rows and all(r.marker is not None for r in rows):
        save_npy(array_path(out, split, "markers"), np.array([r.marker for r in rows], dtype=np.uint8))
    pixels = len(rows) * int(np.prod(shape)) if shape else 0
    mean = total / pixels if pixels else 0.0
    return {"n": len(rows), "intensity_mean": rounded(mean),
            "intensity_std": rounded(float(np.sqrt(max(total_sq / pixels - mean**2, 0))) if pixels else 0.0),
            "patients": len({r.patient for r in rows}) if rows and all(r.patient for r in rows) else None}


def dims(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def preprocessing_settings(data: DataParams) -> dict[str, Any]:
    """What every image went through before it was stored, as the model package carries it to predict."""
    return {"image_size": data.image_size, "spacing": data.spacing, "channels": data.channels,
            "resize": "centre-crop to a square, then bilinear" if data.image_size else "none: sizes must already match",
            "dicom": {"window_center": data.dicom.window_center, "window_width": data.dicom.window_width,
                      "frames": data.dicom.frames, "series": data.dicom.series}}
