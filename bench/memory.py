"""Memory at scale: peak RSS of train (one epoch) and evaluate beside the size of the image array.

Writes synthetic prepared data (smooth random 128×128 images, as bench/prepare_scale.py makes
them) of 20,000 and 100,000 training images, plus 2,000 each for validation and test, straight
in the prepared format (``data/prepared``, ``data/balanced``), chunk by chunk; then runs the
real train and evaluate stages on it in subprocesses, each recording its own high-water mark
(VmHWM). The network is the default small CNN at width 4 (the memory in question is the
data's, and a narrow network keeps an epoch of 100k images to minutes); evaluate runs without
the classical baselines. This tree runs twice: in the default NCHW layout and with
``train.channels_last`` (the layout that pays at this image size), and prints train's peak RSS
beside the training image array's size.

``--baseline REV`` runs the same on the pipeline of another commit (its code and params), side
by side: images/s of training then compare streaming with that commit's loop.

    python bench/memory.py                                # 20k and 100k (several minutes, ~4 GB disk)
    python bench/memory.py --sizes 20000 --baseline HEAD~10   # beside an older revision of the code
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

import numpy as np
import yaml
from common import REPO, provenance, run_stage
from prepare_scale import SIZE, synthetic

from pipeline.core.config import override
from pipeline.core.files import NpyWriter, save_npy, write_json

HELD_OUT = 2000
OVERRIDES = {"train.epochs": 1, "train.width": 4, "evaluate.baselines": [], "evaluate.bootstrap": 200}

def write_prepared(root: Path, n_train: int) -> None:
    """Train/val/test splits and a balanced set that keeps every row, in the prepared format."""
    offset = 0
    for split, n in (("train", n_train), ("val", HELD_OUT), ("test", HELD_OUT)):
        writer, labels = NpyWriter(root / "data/prepared" / split / "images.npy", np.uint8, (SIZE, SIZE, 1)), []
        for _, images, batch_labels in synthetic(n, seed=offset):
            for image in images:
                writer.append(image[..., None])
            labels.append(batch_labels.astype(np.int64))
        writer.close()
        save_npy(root / "data/prepared" / split / "labels.npy", np.concatenate(labels))
        save_npy(root / "data/prepared" / split / "ids.npy", np.array([f"{split}-{i}" for i in range(n)]))
        offset += 1
    write_json(root / "data/prepared/meta.json", {
        "class_names": ["negative", "positive"], "num_classes": 2, "image_size": [SIZE, SIZE], "channels": 1,
        "has_masks": False, "group_name": None, "marker_box": None, "arrays_sha256": "synthetic",
        "preprocessing": {"image_size": None, "channels": None, "resize": "none", "dicom": {
            "window_center": None, "window_width": None, "frames": "error"}}})
    save_npy(root / "data/balanced/indices.npy", np.arange(n_train))
    save_npy(root / "data/balanced/synthetic_images.npy", np.zeros((0, SIZE, SIZE, 1), np.uint8))
    save_npy(root / "data/balanced/synthetic_labels.npy", np.zeros(0, np.int64))
    write_json(root / "data/balanced/class_weights.json", [1.0, 1.0])


def code_of(revision: str | None, into: Path) -> tuple[Path, dict]:
    """The pipeline package and params.yaml of ``revision`` (the working tree when None)."""
    if revision is None:
        return REPO, yaml.safe_load((REPO / "params.yaml").read_text())
    archive = subprocess.run(["git", "archive", revision, "pipeline", "params.yaml"], cwd=REPO, capture_output=True,
                             check=True).stdout
    tarfile.open(fileobj=BytesIO(archive)).extractall(into)
    return into, yaml.safe_load((into / "params.yaml").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--baseline", help="also measure this commit's pipeline on the same data")
    args = parser.parse_args()
    print(provenance())
    rows = []
    with tempfile.TemporaryDirectory(prefix="medcnn-memory-") as tmp:
        head, params = code_of(None, Path(tmp) / "head")
        versions = {"this tree": (head, params, {"train.channels_last": False}),
                    "this tree, channels last": (head, params, {"train.channels_last": True})}
        if args.baseline:
            versions[args.baseline] = (*code_of(args.baseline, Path(tmp) / "baseline"), {})
        for n in args.sizes:
            data = Path(tmp) / f"data-{n}"
            write_prepared(data, n)
            array_mb = n * SIZE * SIZE / 2**20
            for name, (code, params, layout) in versions.items():
                (data / "params.yaml").write_text(yaml.safe_dump(override(params, {**OVERRIDES, **layout}),
                                                                 sort_keys=False))
                trained = run_stage(data, "train", code)
                if trained is None:
                    rows.append((name, n, array_mb, None))
                    print(f"{name} {n}: train killed (out of memory)", file=sys.stderr, flush=True)
                    continue
                speed = json.loads((data / "reports/train/timing.json").read_text())["images_per_second"]
                evaluated = run_stage(data, "evaluate", code) or (float("nan"), float("nan"))
                rows.append((name, n, array_mb, (*trained, speed, *evaluated)))
                print(f"{name} {n}: train {trained[1]:.0f} MB, evaluate {evaluated[1]:.0f} MB", file=sys.stderr,
                      flush=True)
    print("| code | training images | image array MB | train s | train img/s | train peak RSS MB | RSS / array "
          "| evaluate s | evaluate peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, n, array_mb, measured in rows:
        if measured is None:
            print(f"| {name} | {n:,} | {array_mb:.0f} | killed: out of memory | | | | | |")
            continue
        train_s, train_rss, speed, eval_s, eval_rss = measured
        print(f"| {name} | {n:,} | {array_mb:.0f} | {train_s:.0f} | {speed:.0f} | {train_rss:.0f} | "
              f"{train_rss / array_mb:.2f} | {eval_s:.0f} | {eval_rss:.0f} |")


if __name__ == "__main__":
    main()
