"""Images to score: whatever ``pipeline.predict`` is given, as a list of unlabelled items.

INPUT may be an image, DICOM or NIfTI file, a folder (searched at any depth for the formats
prepare reads; hidden files ignored; for a model of volumes, each folder of ``.dcm`` files is
one DICOM series, and INPUT may be such a folder itself), a CSV manifest with a ``path`` column (paths relative to the
manifest's folder, which they may not leave), or a MedMNIST-style ``.npz`` (its
``test_images``). Each item has a pseudonymous id made by prepare's rule (a salted hash of
the file's path relative to INPUT, or the array's split and row), so neither a file name nor
a patient id reaches the output. A file that cannot become an image is not an error here: its
item fails when loaded, and predict writes that as the row's status.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.data.dicom import ImageError, is_dicom
from pipeline.data.images import SUPPORTED, is_supported, read_file
from pipeline.data.npz import read_images
from pipeline.data.privacy import pseudonym

Loader = Callable[[], tuple[np.ndarray, dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class Input:
    id: str  # pseudonymous
    load: Loader  # raises ImageError with the reason when the file cannot become an image
    where: str  # how a message names it on the user's screen; never written to the output


def holds_files(path: Path) -> bool:
    """Whether ``path`` names files (whose names and paths can carry patient data), not an array file."""
    return path.suffix.lower() != ".npz"


def list_inputs(path: Path, salt: str | None, window: tuple[float | None, float | None] = (None, None),
                frames: str = "error", series: bool = False) -> list[Input]:
    """Every image in ``path`` (file, folder, manifest or npz), in a stable order. A file's id is
    the salted hash of its path relative to ``path`` (prepare's rule), or, with ``salt`` None,
    that path itself (for inputs that hold no patient data)."""
    def name(key: str) -> str:
        return key if salt is None else pseudonym(key, salt, "img-")

    def from_file(file: Path, key: str) -> Input:
        return Input(name(key), lambda: read_file(file, *window, frames), key)

    if path.is_dir():
        keys = sorted(_image_files(path, series))
        if "." in keys:  # INPUT is one series
            return [from_file(path, path.name)]
        if not keys:
            raise PipelineError(f"{path}: no image files ({', '.join(SUPPORTED)}) in this folder")
        return [from_file(path / key, key) for key in keys]
    if path.suffix.lower() == ".npz":
        images = read_images(path, "test_images")
        return [Input(f"test-{i:06d}", lambda image=image: (image, {}), f"{path.name} test_images[{i}]")
                for i, image in enumerate(images)]
    if path.suffix.lower() == ".csv":
        return [from_file(file, key) if problem is None else Input(name(key), _failing(problem), key)
                for file, key, problem in _manifest(path)]
    return [from_file(path, path.name)]


def _image_files(root: Path, series: bool) -> Iterator[str]:
    """Paths (relative, '/'-separated) of the supported files under ``root``, hidden ones skipped;
    with ``series``, a folder of ``.dcm`` files stands for them ("." for ``root`` itself)."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        relative = Path(folder).relative_to(root)
        names = [n for n in files if not n.startswith(".") and is_supported(n)]
        if series and any(map(is_dicom, names)):
            yield relative.as_posix()
            names = [n for n in names if not is_dicom(n)]
        for name in names:
            yield (relative / name).as_posix()


def _manifest(path: Path) -> list[tuple[Path, str, str | None]]:
    """(file, key, problem) per row of a manifest with a ``path`` column."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if "path" not in (reader.fieldnames or []):
            raise PipelineError(f"{path}: no 'path' column (has: {reader.fieldnames})")
        rows = [row["path"].strip() for row in reader]
    if not rows:
        raise PipelineError(f"{path}: manifest has no rows")
    base = path.parent.resolve()
    found = []
    for rel in rows:
        target = (base / rel).resolve()
        problem = ("path leaves the manifest's folder" if not target.is_relative_to(base)
                   else None if target.is_file() else "file does not exist")
        found.append((target, rel, problem))
    return found


def _failing(reason: str) -> Loader:
    def load() -> tuple[np.ndarray, dict[str, Any]]:
        raise ImageError(reason)
    return load
