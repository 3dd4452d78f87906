"""Stage 1, prepare: what the user holds (or the built-in phantom) → validated ``.npy`` splits.

Sources (``data.source``, see :mod:`pipeline.data.sources`): ``phantom`` (images or volumes),
``npz`` (MedMNIST format, 2-D or 3-D), ``medmnist`` (official file by name and size, downloaded
once and MD5-verified), ``folder`` (one sub-folder per class) and ``csv`` (a manifest with
optional patient ids and splits); PNG, JPEG, TIFF and DICOM images, and NIfTI files and DICOM
series as volumes (:mod:`pipeline.data.volumes`).

Every image goes through the same path: decode, preprocess (crop/resize, channels), hash,
duplicate policy, then append to its split's array on disk (streamed, so a 50k-image folder
never sits in memory). Given splits are kept; otherwise images are split by patient (grouped,
stratified, seeded). Patient ids and file names are pseudonymised before anything is saved.

All problems of one kind are reported together in one error naming the first 10 files, and
the splits are written to a temporary folder that replaces ``data/prepared`` only on
success: bad input leaves no partial output.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core import paths
from pipeline.core.config import DataParams, Params
from pipeline.core.dataset import SPLITS, array_path, save_meta
from pipeline.core.errors import PipelineError
from pipeline.core.files import digest_tree, digests_sha256, rounded, staged_dir, write_json
from pipeline.core.runtime import stage_main
from pipeline.data import patient_split, phantom
from pipeline.data.labels import counts as label_counts
from pipeline.data.labels import detect as detect_task
from pipeline.data.labels import unknown as label_unknown
from pipeline.data.sources import Source, check_classes, load_source
from pipeline.data.writing import preprocessing_settings, write_splits

log = logging.getLogger(__name__)


def summarise(source: Source, found: dict[str, Any], prepared: Path, data: DataParams) -> dict[str, Any]:
    names = source.class_names
    labels = {s: np.load(array_path(prepared, s, "labels")) for s in SPLITS}
    patients = {s: np.load(array_path(prepared, s, "patients")) for s in SPLITS
                if array_path(prepared, s, "patients").exists()}
    splits = {}
    for split in SPLITS:
        counts, unknown = label_counts(labels[split], names), label_unknown(labels[split], names)
        n = len(labels[split])
        splits[split] = {**found["stats"][split], "class_counts": counts,
                         # multi-label: of the images where the finding was assessed
                         "prevalence": {c: rounded(k / max(n - (unknown or {}).get(c, 0), 1)) for c, k in counts.items()}}
        if unknown is not None:
            splits[split]["unknown_counts"] = unknown
    across = [d for d in found["duplicates"] if d["split"] != d["duplicate_of_split"]]
    shared = patient_split.overlap(patients) if len(patients) == len(SPLITS) else []
    checks = {
        # None: nothing to check, no split carries patient ids (the report says so, not "0").
        "patient_overlap": len(shared) if len(patients) == len(SPLITS) else None,
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
    return {"splits": splits, "checks": checks, "split_method": source.split_method, "identifiers": source.identifiers,
            "excluded": len(found["unreadable"]), "skipped": found["unreadable"], "dicom": found["dicom"],
            "preprocessing": found["preprocessing"]}


def run(params: Params, out_dir: Path = paths.PREPARED, summary_path: Path = paths.DATA_SUMMARY) -> dict[str, Any]:
    data = params.data
    source = load_source(data, params.seed)
    with staged_dir(out_dir) as tmp:
        found = write_splits(source, data, tmp)
        arrays = {s: {"labels": np.load(array_path(tmp, s, "labels"))} for s in SPLITS}
        where = str(data.path or data.source)
        names = check_classes(arrays, tuple(source.class_names), where)
        task = detect_task(data.task, arrays["train"]["labels"], len(names), source.known_task, where)
        first = np.load(array_path(tmp, "train", "images"), mmap_mode="r")
        has = {name: array_path(tmp, "train", name).exists() for name in ("masks", "groups", "markers")}
        meta = {"task": task, "class_names": names, "num_classes": len(names), "image_size": list(first.shape[1:-1]),
                "channels": int(first.shape[-1]), "has_masks": has["masks"],
                "group_name": ("site" if data.source == "phantom" else data.group_column) if has["groups"] else None,
                "marker_box": list(phantom.marker_box(int(first.shape[1]))) if has["markers"] else None,
                "preprocessing": preprocessing_settings(data)}
        del first
        arrays = digest_tree(tmp)
        meta["arrays_sha256"] = digests_sha256(arrays)
        save_meta(tmp, meta)
        details = summarise(source, found, tmp, data)
        outputs = digest_tree(tmp)
    summary = {"input": source.provenance, **meta, **details, "outputs_sha256": outputs}
    write_json(summary_path, summary)
    log.info("prepared %s, %s task, %s %s: %s", {s: summary["splits"][s]["n"] for s in SPLITS}, task,
             "findings" if task == "multilabel" else "classes", names,
             {s: summary["splits"][s]["class_counts"] for s in SPLITS})
    if found["duplicates"]:
        log.warning("%d exact duplicate image(s) found (data.duplicates=%s); see reports/data/summary.json",
                    len(found["duplicates"]), data.duplicates)
    return summary


def main() -> None:
    stage_main(__doc__.splitlines()[0], run)


if __name__ == "__main__":
    main()
