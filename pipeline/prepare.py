"""Stage 1, prepare: raw data (or the built-in phantom) → validated ``.npy`` splits + summary.

Everything is read and validated before anything is written; the splits are written to a
temporary folder that replaces ``data/prepared`` only when complete, so bad input leaves no
partial output.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import paths, phantom, sources
from pipeline.files import sha256_file, sha256_tree, staged_dir, write_json
from pipeline.params import DataParams, Params, as_dict
from pipeline.runtime import stage_main
from pipeline.splits import SPLITS, save_meta, save_split

log = logging.getLogger(__name__)


def load_source(data: DataParams, seed: int) -> tuple[dict[str, dict[str, np.ndarray]], list[str], dict[str, Any]]:
    """Splits, class names and a provenance record for the configured source."""
    if data.source == "phantom":
        log.info("generating phantom scans (%d/%d/%d)", data.phantom.n_train, data.phantom.n_val, data.phantom.n_test)
        splits = {split: phantom.generate_split(data.phantom, seed, split) for split in SPLITS}
        names = list(data.class_names) or list(phantom.CLASS_NAMES)
        provenance = {"source": "phantom", "generator": "pipeline.phantom", "settings": as_dict(data.phantom), "seed": seed}
        return splits, sources.check_classes(splits, tuple(names), "phantom"), provenance
    path = Path(data.path)
    log.info("reading %s", path)
    splits = sources.read_npz(path)
    names = sources.check_classes(splits, data.class_names, str(path))
    provenance = {"source": data.source, "path": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}
    return splits, names, provenance


def describe(splits: dict[str, dict[str, np.ndarray]], class_names: list[str]) -> dict[str, Any]:
    """Per-split counts per class, prevalence and intensity statistics."""
    out = {}
    for split, data in splits.items():
        counts = np.bincount(data["labels"], minlength=len(class_names))
        images = data["images"]
        out[split] = {
            "n": int(len(images)),
            "class_counts": {name: int(c) for name, c in zip(class_names, counts)},
            "prevalence": {name: round(float(c) / len(images), 6) for name, c in zip(class_names, counts)},
            "intensity_mean": round(float(images.mean()), 4),
            "intensity_std": round(float(images.std()), 4),
        }
    return out


def run(params: Params, out_dir: Path = paths.PREPARED, summary_path: Path = paths.DATA_SUMMARY) -> dict[str, Any]:
    splits, class_names, provenance = load_source(params.data, params.seed)
    height, width, channels = splits["train"]["images"].shape[1:]
    meta = {
        "class_names": class_names,
        "num_classes": len(class_names),
        "image_size": [int(height), int(width)],
        "channels": int(channels),
        "has_masks": all("masks" in s for s in splits.values()),
        "group_name": "site" if all("groups" in s for s in splits.values()) else None,
    }
    with staged_dir(out_dir) as tmp:
        for split in SPLITS:
            save_split(tmp, split, splits[split])
        save_meta(tmp, meta)
        outputs = sha256_tree(tmp)
    summary = {"input": provenance, **meta, "splits": describe(splits, class_names), "outputs_sha256": outputs}
    write_json(summary_path, summary)
    counts = {s: summary["splits"][s]["class_counts"] for s in SPLITS}
    log.info("prepared %s images of %dx%dx%d, classes %s: %s", sum(len(s["labels"]) for s in splits.values()),
             height, width, channels, class_names, counts)
    return summary


def main() -> None:
    stage_main(__doc__.splitlines()[0], run)


if __name__ == "__main__":
    main()
