"""Stage 1, prepare: what the user holds (or the built-in phantom) → validated ``.npy`` splits.

Sources (``data.source``): ``phantom``, ``npz`` (MedMNIST format), ``medmnist`` (official file
by name and size, downloaded once and MD5-verified), ``folder`` (one sub-folder per class)
and ``csv`` (a manifest with optional patient ids and splits); PNG, JPEG, TIFF and DICOM.

Every image goes through the same path: decode, preprocess (crop/resize, channels), hash,
duplicate policy, then append to its split's array on disk (streamed, so a 50k-image folder
never sits in memory). Given splits are kept; otherwise images are split by patient (grouped,
stratified, seeded). Patient ids and file names are pseudonymised before anything is saved.

All problems of one kind are reported together in one error naming the first 10 files, and
the splits are written to a temporary folder that replaces ``data/prepared`` only on
success: bad input leaves no partial output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline import paths, phantom, sources, splitting
from pipeline.dicom import ImageError, read_patient_id
from pipeline.errors import PipelineError
from pipeline.files import NpyWriter, save_npy, sha256_file, sha256_tree, staged_dir, write_json
from pipeline.images import preprocess, read_file, resize_mask
from pipeline.manifest import Record, fail, read_manifest, scan_folder
from pipeline.params import DataParams, Params, as_dict
from pipeline.privacy import pseudonym, resolve_salt
from pipeline.runtime import stage_main
from pipeline.splits import SPLITS, save_meta

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Item:
    """One image on its way to ``data/prepared``; ``load`` decodes it only when written."""

    id: str
    label: int
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


def from_arrays(splits: dict[str, dict[str, np.ndarray]], where: str) -> dict[str, list[Item]]:
    """Items over in-memory arrays (phantom, npz)."""
    out = {}
    for split, data in splits.items():
        out[split] = [Item(id=str(data["ids"][i]), label=int(data["labels"][i]), where=f"{where} {split}[{i}]",
                           load=lambda img=data["images"][i]: (img, {}),
                           group=str(data["groups"][i]) if "groups" in data else None,
                           mask=data["masks"][i] if "masks" in data else None,
                           marker=int(data["markers"][i]) if "markers" in data else None)
                      for i in range(len(data["labels"]))]
    return out


def load_source(data: DataParams, seed: int) -> Source:
    if data.source == "phantom":
        log.info("generating phantom scans (%d/%d/%d)", data.phantom.n_train, data.phantom.n_val, data.phantom.n_test)
        arrays = {split: phantom.generate_split(data.phantom, seed, split) for split in SPLITS}
        names = sources.check_classes(arrays, data.class_names or phantom.CLASS_NAMES, "phantom")
        return Source(from_arrays(arrays, "phantom"), names,
                      {"source": "phantom", "generator": "pipeline.phantom", "settings": as_dict(data.phantom), "seed": seed},
                      f"generated per split with seed {seed}; every scan is a different simulated patient")
    if data.source in ("npz", "medmnist"):
        path = Path(data.path) if data.source == "npz" else sources.fetch_medmnist(data.name, data.size, Path(data.raw_dir))
        log.info("reading %s", path)
        arrays = sources.read_npz(path)
        names = sources.check_classes(arrays, data.class_names, str(path))
        return Source(from_arrays(arrays, path.name), names,
                      {"source": data.source, "path": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size},
                      "the splits given in the input file")
    return load_files(data, seed)


def load_files(data: DataParams, seed: int) -> Source:
    """An image folder or CSV manifest: records → pseudonyms → splits → lazily decoded items."""
    root = Path(data.path)
    salt = resolve_salt(data.pseudonym_salt)
    if data.source == "folder":
        records, names, unsupported = scan_folder(root, data.class_names, data.on_error)
        base = root
    else:
        records, names = read_manifest(root, data.class_names, data.group_column)
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
        assigned, method = np.array([r.split for r in records]), "the splits given in the manifest"
    else:
        groups = np.array([p or i for p, i in zip(patients, ids)])
        assigned = splitting.assign(labels, groups, data.split.val, data.split.test, seed)
        method = (f"grouped by patient and stratified by label (val {data.split.val}, test {data.split.test}, "
                  f"seed {seed}); no patient in two splits")
    items = {s: [] for s in SPLITS}
    for record, key, item_id, patient, split in zip(records, keys, ids, patients, assigned):
        items[str(split)].append(Item(id=item_id, label=record.label, where=key, patient=patient, group=record.group,
                                      load=lambda p=record.path: read_file(p, data.dicom.window_center,
                                                                           data.dicom.window_width, data.dicom.frames)))
    listing = "".join(f"{k}\t{sha256_file(r.path)}\n" for k, r in sorted(zip(keys, records), key=lambda kr: kr[0]))
    provenance = {"source": data.source, "path": root.name, "files": len(records),
                  "files_sha256": hashlib.sha256(listing.encode()).hexdigest()}
    skipped = [{"id": pseudonym(u, salt, "img-"), "reason": "not an image file"} for u in unsupported]
    return Source(items, names, provenance, method, skipped)


def _with_dicom_patient(record: Record) -> Record:
    if record.patient or record.path.suffix.lower() != ".dcm":
        return record
    try:
        return dataclasses.replace(record, patient=read_patient_id(record.path))
    except ImageError:
        return record  # unreadable: reported when the pixels are read


def write_splits(source: Source, data: DataParams, out: Path) -> dict[str, Any]:
    """Decode, preprocess, check and stream every item to ``out``; returns the checks' findings."""
    shape: tuple[int, ...] | None = None
    first_where = ""
    seen: dict[str, tuple[str, str]] = {}
    unreadable, mismatched, duplicates = [], [], []
    skipped, stats, tags_seen = list(source.skipped), {}, Counter()
    for split in SPLITS:
        writer, rows, total, total_sq = None, [], 0.0, 0.0
        for item in tqdm(source.splits[split], desc=f"prepare {split}", leave=False, disable=None):
            try:
                image, tags = item.load()
            except ImageError as exc:
                unreadable.append(f"{item.where} ({exc})")
                skipped.append({"id": item.id, "reason": str(exc)})
                continue
            image = preprocess(image, data.image_size, data.channels)
            if shape is None:
                shape, first_where = image.shape, item.where
            if image.shape != shape:
                mismatched.append(f"{item.where} is {_dims(image.shape)}")
                continue
            digest = hashlib.sha256(image.tobytes()).hexdigest()
            if digest in seen:
                duplicates.append({"split": split, "id": item.id, "duplicate_of_split": seen[digest][0],
                                   "duplicate_of": seen[digest][1], "where": item.where})
                if data.duplicates == "drop":
                    continue
            seen.setdefault(digest, (split, item.id))
            writer = writer or NpyWriter(out / split / "images.npy", np.uint8, shape)
            writer.append(image)
            total, total_sq = total + float(image.sum(dtype=np.float64)), total_sq + float(np.square(image, dtype=np.float64).sum())
            rows.append(item)
            tags_seen.update(f"{k}={v}" for k, v in tags.items() if k in ("Modality", "PhotometricInterpretation"))
        if writer is not None:
            writer.close()
        stats[split] = _write_columns(out / split, rows, data.image_size, total, total_sq, shape)
    if data.on_error != "skip":
        fail(data.path, "cannot read (data.on_error: skip skips them)", unreadable)
    fail(data.path, f"image size differs from the first image ({first_where}: {_dims(shape or ())}) and "
                    "data.image_size is null", mismatched)
    if data.duplicates == "error":
        fail(data.path, "exact duplicate image (data.duplicates: warn or drop)",
             [f"{d['where']} = {d['duplicate_of_split']}:{d['duplicate_of']}" for d in duplicates])
    for split in SPLITS:
        if stats[split]["n"] == 0:
            raise PipelineError(f"{data.path or data.source}: split '{split}' is empty "
                                "(too few images or patients for data.split, or every image was skipped)")
    return {"stats": stats, "unreadable": skipped, "duplicates": duplicates, "dicom": dict(sorted(tags_seen.items()))}


def _write_columns(folder: Path, rows: list[Item], size: int | None, total: float, total_sq: float,
                   shape: tuple[int, ...] | None) -> dict[str, Any]:
    save_npy(folder / "labels.npy", np.array([r.label for r in rows], dtype=np.int64))
    save_npy(folder / "ids.npy", np.array([r.id for r in rows], dtype=str))
    if rows and all(r.mask is not None for r in rows):
        save_npy(folder / "masks.npy", np.stack([resize_mask(r.mask, size) for r in rows]))
    if rows and all(r.group for r in rows):
        save_npy(folder / "groups.npy", np.array([r.group for r in rows], dtype=str))
    if rows and all(r.patient for r in rows):
        save_npy(folder / "patients.npy", np.array([r.patient for r in rows], dtype=str))
    if rows and all(r.marker is not None for r in rows):
        save_npy(folder / "markers.npy", np.array([r.marker for r in rows], dtype=np.uint8))
    pixels = len(rows) * int(np.prod(shape)) if shape else 0
    mean = total / pixels if pixels else 0.0
    return {"n": len(rows), "intensity_mean": round(mean, 4),
            "intensity_std": round(float(np.sqrt(max(total_sq / pixels - mean**2, 0))) if pixels else 0.0, 4),
            "patients": len({r.patient for r in rows}) if rows and all(r.patient for r in rows) else None}


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def summarise(source: Source, found: dict[str, Any], prepared: Path, data: DataParams) -> dict[str, Any]:
    names = source.class_names
    labels = {s: np.load(prepared / s / "labels.npy") for s in SPLITS}
    patients = {s: np.load(prepared / s / "patients.npy") for s in SPLITS if (prepared / s / "patients.npy").exists()}
    splits = {}
    for split in SPLITS:
        counts = np.bincount(labels[split], minlength=len(names))
        n = int(counts.sum())
        splits[split] = {**found["stats"][split], "class_counts": dict(zip(names, map(int, counts))),
                         "prevalence": {c: round(int(k) / n, 6) for c, k in zip(names, counts)}}
    across = [d for d in found["duplicates"] if d["split"] != d["duplicate_of_split"]]
    shared = splitting.overlap(patients) if len(patients) == len(SPLITS) else []
    checks = {
        "patient_overlap": len(shared),
        "duplicates_policy": data.duplicates,
        "duplicates_within_splits": {s: sum(d["split"] == s and d["duplicate_of_split"] == s for d in found["duplicates"])
                                     for s in SPLITS},
        "duplicates_across_splits": len(across),
        "duplicates_dropped": len(found["duplicates"]) if data.duplicates == "drop" else 0,
        "duplicate_ids": [f"{d['split']}:{d['id']} = {d['duplicate_of_split']}:{d['duplicate_of']}"
                          for d in found["duplicates"][:50]],
    }
    if shared:
        raise PipelineError(f"{data.path}: {len(shared)} patient(s) appear in more than one split of the given splits "
                            f"(pseudonyms: {', '.join(shared[:10])})")
    return {"splits": splits, "checks": checks, "split_method": source.split_method,
            "excluded": len(found["unreadable"]), "skipped": found["unreadable"], "dicom": found["dicom"]}


def run(params: Params, out_dir: Path = paths.PREPARED, summary_path: Path = paths.DATA_SUMMARY) -> dict[str, Any]:
    data = params.data
    source = load_source(data, params.seed)
    with staged_dir(out_dir) as tmp:
        found = write_splits(source, data, tmp)
        arrays = {s: {"labels": np.load(tmp / s / "labels.npy")} for s in SPLITS}
        names = sources.check_classes(arrays, tuple(source.class_names), str(data.path or data.source))
        first = np.load(tmp / "train" / "images.npy", mmap_mode="r")
        meta = {"class_names": names, "num_classes": len(names), "image_size": list(first.shape[1:3]),
                "channels": int(first.shape[3]), "has_masks": (tmp / "train" / "masks.npy").exists(),
                "group_name": ("site" if data.source == "phantom" else data.group_column)
                if (tmp / "train" / "groups.npy").exists() else None,
                "marker_box": list(phantom.marker_box(int(first.shape[1])))
                if (tmp / "train" / "markers.npy").exists() else None}
        del first
        save_meta(tmp, meta)
        details = summarise(source, found, tmp, data)
        outputs = sha256_tree(tmp)
    summary = {"input": source.provenance, **meta, **details, "outputs_sha256": outputs}
    write_json(summary_path, summary)
    log.info("prepared %s, classes %s: %s", {s: summary["splits"][s]["n"] for s in SPLITS}, names,
             {s: summary["splits"][s]["class_counts"] for s in SPLITS})
    if found["duplicates"]:
        log.warning("%d exact duplicate image(s) found (data.duplicates=%s); see reports/data/summary.json",
                    len(found["duplicates"]), data.duplicates)
    return summary


def main() -> None:
    stage_main(__doc__.splitlines()[0], run)


if __name__ == "__main__":
    main()
