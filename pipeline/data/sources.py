"""Every data source as labelled items: one loader per ``data.source``, in the ``SOURCES`` registry.

A loader returns a :class:`Source`: items per split (each decoded only when ``prepare``
writes it, so a 50k-image folder never sits in memory), class names, provenance for the
report, and how the splits were made. Sources with given splits keep them (the phantom's
generated splits, an ``.npz``'s own, a manifest's complete ``split`` column); folders and
manifests without one are split by patient, stratified and seeded. Patient ids and file
names are pseudonymised here, before anything is saved.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import DataParams, as_dict
from pipeline.core.dataset import SPLITS
from pipeline.core.errors import PipelineError
from pipeline.core.files import file_digest
from pipeline.data import catalog, patient_split, phantom
from pipeline.data.dicom import ImageError, is_dicom, read_patient_id
from pipeline.data.images import read_file
from pipeline.data.labels import check_matrix, is_matrix, strata
from pipeline.data.medmnist import fetch_medmnist
from pipeline.data.npz import read_npz
from pipeline.data.privacy import pseudonym, resolve_salt
from pipeline.data.records import Record, read_manifest, scan_folder
from pipeline.data.volumes import read_series_patient, series_files

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Item:
    """One image on its way to ``data/prepared``; ``load`` decodes it only when written."""

    id: str
    label: int | np.ndarray  # class index or grade; a row of 1/0/-1 per finding (multi-label)
    load: Callable[[], tuple[np.ndarray, dict[str, Any]]]
    where: str  # how error messages name it (a path or a row); never saved
    patient: str | None = None  # already pseudonymised
    group: str | None = None
    mask: np.ndarray | None = None
    marker: int | None = None  # phantom shortcut marker present


@dataclasses.dataclass
class Source:
    splits: dict[str, list[Item]]
    class_names: list[str]
    provenance: dict[str, Any]
    split_method: str
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)
    # What identifies an image and a patient in the outputs, in words, and whether the salt was set
    # (None where nothing is hashed): the report states it instead of assuming pseudonyms.
    identifiers: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The task the source itself declares (the phantom's, a catalogued dataset's), for data.task: auto.
    known_task: str | None = None


def from_arrays(splits: dict[str, dict[str, np.ndarray]], where: str) -> dict[str, list[Item]]:
    """Items over in-memory arrays (phantom, npz)."""
    out = {}
    for split, data in splits.items():
        matrix = is_matrix(data["labels"])
        out[split] = [Item(id=str(data["ids"][i]), label=data["labels"][i] if matrix else int(data["labels"][i]),
                           where=f"{where} {split}[{i}]",
                           load=lambda img=data["images"][i]: (img, {}),
                           group=str(data["groups"][i]) if "groups" in data else None,
                           mask=data["masks"][i] if "masks" in data else None,
                           marker=int(data["markers"][i]) if "markers" in data else None)
                      for i in range(len(data["labels"]))]
    return out


def load_phantom(data: DataParams, seed: int) -> Source:
    log.info("generating phantom scans (%d/%d/%d)", data.phantom.n_train, data.phantom.n_val, data.phantom.n_test)
    arrays = {split: phantom.generate_split(data.phantom, seed, split) for split in SPLITS}
    names = check_classes(arrays, data.class_names or phantom.class_names(data.phantom), "phantom")
    return Source(from_arrays(arrays, "phantom"), names,
                  {"source": "phantom", "generator": "pipeline.data.phantom", "settings": as_dict(data.phantom),
                   "seed": seed},
                  f"generated per split with seed {seed}; every scan is a different simulated patient",
                  identifiers={"images": "serial numbers given by the generator (phantom-<split>-<n>)",
                               "patients": None, "salt": None}, known_task=data.phantom.task)


def load_npz(data: DataParams, seed: int, path: Path | None = None) -> Source:
    path = path or Path(data.path)
    log.info("reading %s", path)
    arrays = read_npz(path)
    known = catalog.lookup(data.source, path.name)
    names = check_classes(arrays, data.class_names, str(path))
    return npz_source(path, data.source, arrays, names, "the train/val/test splits given in the input file",
                      (known or {}).get("task"))


def npz_source(path: Path, kind: str, arrays: dict[str, dict[str, np.ndarray]], names: list[str], method: str,
               known_task: str | None = None) -> Source:
    """The :class:`Source` of a MedMNIST-format file's arrays (``kind``: npz or medmnist), with its
    provenance (file name, sha256, size) and how its images are identified."""
    return Source(from_arrays(arrays, path.name), names,
                  {"source": kind, "path": path.name, "sha256": file_digest(path), "bytes": path.stat().st_size},
                  method, identifiers={"images": "split and position in the input file (<split>-<index>)",
                                       "patients": None, "salt": None}, known_task=known_task)


def load_medmnist(data: DataParams, seed: int) -> Source:
    return load_npz(data, seed, fetch_medmnist(data.name, data.size, Path(data.raw_dir)))


def load_files(data: DataParams, seed: int, site: bool = False) -> Source:
    """An image folder or CSV manifest: records → pseudonyms → splits → lazily decoded items.
    ``site`` (an external validation site): class folders may be some of ``data.class_names``, and
    without a complete split column every image lies in the test split, none split off."""
    root = Path(data.path)
    salt = resolve_salt(data.pseudonym_salt)
    if data.source == "folder":
        records, names, unsupported = scan_folder(root, data.class_names, data.on_error, data.dicom.series, site)
        base = root
    else:
        records, names = read_manifest(root, data.class_names, data.group_column, data.dicom.series)
        unsupported, base = [], root.parent.resolve()
    records = [_with_dicom_patient(r) for r in records]
    if any(r.patient for r in records) and not salt:
        raise PipelineError(f"{root}: the data carry patient ids; set MEDCNN_PSEUDONYM_SALT (or data.pseudonym_salt) "
                            "to a secret so they can be pseudonymised")
    keys = [r.path.resolve().relative_to(base.resolve()).as_posix() for r in records]
    ids = [pseudonym(k, salt, "img-") for k in keys]
    patients = [pseudonym(r.patient, salt) if r.patient else None for r in records]
    labels = np.array([r.label for r in records])
    if all(r.split for r in records):
        assigned, method = np.array([r.split for r in records]), "the train/val/test splits given in the manifest"
    elif site:
        assigned, method = np.full(len(records), "test"), "every image (an external site)"
    else:
        groups = np.array([p or i for p, i in zip(patients, ids)])
        assigned = patient_split.assign(strata(labels), groups, data.split.val, data.split.test, seed)
        unit = "patient" if any(patients) else "image (no patient ids: each image counts as its own patient)"
        method = (f"grouped by {unit} and stratified by {'number of findings' if is_matrix(labels) else 'label'} (val {data.split.val}, test {data.split.test}, "
                  f"seed {seed}); no patient in two splits")
    items = {s: [] for s in SPLITS}
    for record, key, item_id, patient, split in zip(records, keys, ids, patients, assigned):
        items[str(split)].append(Item(id=item_id, label=record.label, where=key, patient=patient, group=record.group,
                                      load=lambda p=record.path: read_file(p, data.dicom.window_center,
                                                                           data.dicom.window_width, data.dicom.frames)))
    listing = "".join(f"{k}\t{_digest(r.path)}\n" for k, r in sorted(zip(keys, records), key=lambda kr: kr[0]))
    provenance = {"source": data.source, "path": root.name, "files": len(records),
                  "files_sha256": hashlib.sha256(listing.encode()).hexdigest()}
    skipped = [{"id": pseudonym(u, salt, "img-"), "reason": "not an image file"} for u in unsupported]
    identifiers = {"images": "salted SHA-256 pseudonyms of the file paths (img-<16 hex digits>)",
                   "patients": "salted SHA-256 pseudonyms of the patient ids (p-<16 hex digits>)" if any(patients)
                   else None, "salt": "set" if salt else "empty"}
    return Source(items, names, provenance, method, skipped, identifiers)


SOURCES: dict[str, Callable[[DataParams, int], Source]] = {
    "phantom": load_phantom, "npz": load_npz, "medmnist": load_medmnist, "folder": load_files, "csv": load_files,
}


def load_source(data: DataParams, seed: int) -> Source:
    return SOURCES[data.source](data, seed)


def _digest(path: Path) -> str:
    """A file's SHA-256; a series folder's: of its slices' names and digests."""
    if path.is_dir():
        return hashlib.sha256("".join(f"{p.name}\t{file_digest(p)}\n" for p in series_files(path)).encode()).hexdigest()
    return file_digest(path)


def _with_dicom_patient(record: Record) -> Record:
    if record.patient or not (record.path.is_dir() or is_dicom(record.path)):
        return record
    try:
        found = read_series_patient(record.path) if record.path.is_dir() else read_patient_id(record.path)
        return dataclasses.replace(record, patient=found)
    except ImageError:
        return record  # unreadable: reported when the pixels are read


def check_classes(splits: dict[str, dict[str, np.ndarray]], class_names: tuple[str, ...], source: str) -> list[str]:
    """Check labels against the class list and return the class (finding, grade) names.

    Multi-label matrices are checked by :func:`pipeline.data.labels.check_matrix`. With
    ``class_names`` given, K is its length and every label must lie in 0..K-1. Without,
    K is the largest label + 1 and names are "0".."K-1". Either way every class must occur in
    the training split and there must be at least two classes.
    """
    if is_matrix(splits["train"]["labels"]):
        return check_matrix(splits, class_names, source)
    largest = max(int(s["labels"].max()) for s in splits.values())
    k = len(class_names) if class_names else largest + 1
    for split, data in splits.items():
        bad = np.flatnonzero((data["labels"] < 0) | (data["labels"] >= k))
        if bad.size:
            raise PipelineError(
                f"{source}: {split} labels outside 0..{k - 1}: {bad.size} samples "
                f"(first at index {bad[0]}, label {data['labels'][bad[0]]})"
            )
    if k < 2:
        raise PipelineError(f"{source}: found {k} class; at least 2 are needed")
    absent = sorted(set(range(k)) - set(np.unique(splits["train"]["labels"]).tolist()))
    if absent:
        raise PipelineError(f"{source}: class(es) {absent} have no training images")
    return list(class_names) if class_names else [str(i) for i in range(k)]

