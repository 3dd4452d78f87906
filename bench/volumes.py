"""Volumes against images: the default 3-D phantom pipeline beside the 2-D one, and prepare's memory on NIfTI.

``pipeline`` (default): the default `dvc repro` on the 2-D phantom and with
``-S data.phantom.ndim=3``, side by side in temporary git copies of the project (rounds
alternate between them), stage by stage (`dvc repro -s`, so each time includes DVC's own
start-up), plus the 3-D run with the seed network (``train.model=seed_cnn``) for its test
ROC AUC. Prints per-stage wall times, the 3-D/2-D ratio, test ROC AUC, and explanation
localisation per method with the sanity verdicts.

``memory``: writes N volumes of 64³ as ``.nii.gz`` files (int16 CT-like, two classes, in a
temporary folder), runs `python -m pipeline.prepare` on them in a subprocess and reports its
peak RSS (VmHWM) beside the size of the prepared uint8 array.

    python bench/volumes.py                      # pipeline, 1 round (about 12 minutes)
    python bench/volumes.py --rounds 2 --no-seed
    python bench/volumes.py memory --volumes 2000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REPO, alternate, print_stage_table, provenance, run_stage

from pipeline.core.workspace import copy_project

RUNS = {"2-D default": {}, "3-D default": {"data.phantom.ndim": 3},
        "3-D seed_cnn": {"data.phantom.ndim": 3, "train.model": "seed_cnn"}}


def pipeline(rounds: int, seed_network: bool) -> None:
    runs = {k: v for k, v in RUNS.items() if seed_network or k != "3-D seed_cnn"}
    with tempfile.TemporaryDirectory(prefix="medcnn-volumes-") as tmp:
        copies = {}
        for name, overrides in runs.items():
            root = Path(tmp) / name.replace(" ", "-")
            root.mkdir()
            copies[name] = (root, copy_project(root, overrides))
        mean = alternate(copies, rounds, once=("3-D seed_cnn",))  # its AUC is what matters
        results = {name: json.loads((root / "reports/eval/metrics.json").read_text())["test"]
                   for name, (root, _) in copies.items()}
        explained = {name: json.loads((root / "reports/explain/metrics.json").read_text())["explain"]
                     for name, (root, _) in copies.items() if name != "3-D seed_cnn"}
    print_stage_table("2-D", mean["2-D default"], "3-D", mean["3-D default"], rounds)
    print()
    print("| run | test ROC AUC | test accuracy | wall s |")
    print("|---|---|---|---|")
    for name in runs:
        print(f"| {name} | {results[name]['roc_auc']:.4f} | {results[name]['accuracy']:.4f} "
              f"| {sum(mean[name].values()):.0f} |")
    print()
    print("| run | method | pointing game | mass in mask | AUPRC vs mask | sanity |")
    print("|---|---|---|---|---|---|")
    for name, rows in explained.items():
        for method, row in rows.items():
            print(f"| {name} | {method} | {row.get('pointing_game')} | {row.get('mass_in_mask')} | "
                  f"{row.get('auprc_mask')} | {'pass' if row['sanity_pass'] else 'FAIL'} |")


def memory(count: int, side: int = 64) -> None:
    import nibabel

    from pipeline.core.config import write_params

    with tempfile.TemporaryDirectory(prefix="medcnn-nifti-") as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        grid = np.stack(np.mgrid[0:side, 0:side, 0:side]) - side / 2
        body = (grid**2).sum(axis=0) < (0.4 * side) ** 2
        start = time.perf_counter()
        for i in range(count):
            label = "lesion" if i % 5 == 0 else "normal"
            hu = np.where(body, 40, -1000) + rng.integers(-20, 20, (side,) * 3)
            folder = root / "volumes" / label
            folder.mkdir(parents=True, exist_ok=True)
            nibabel.save(nibabel.Nifti1Image(hu.astype(np.int16), np.diag([0.8, 0.8, 2.0, 1.0])),
                         folder / f"case{i:05d}.nii.gz")
        print(f"wrote {count} volumes in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        write_params(root / "params.yaml", {"data.source": "folder", "data.path": str(root / "volumes"),
                                            "data.dicom.window_center": 40.0, "data.dicom.window_width": 400.0,
                                            "data.duplicates": "warn"}, REPO / "params.yaml")
        wall, peak = run_stage(root, "prepare")
        array = count * side**3 / 2**20
    print("| volumes | side | prepared array MB | prepare s | prepare peak RSS MB | RSS / array |")
    print("|---|---|---|---|---|---|")
    print(f"| {count:,} | {side}³ | {array:.0f} | {wall:.0f} | {peak:.0f} | {peak / array:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", choices=("pipeline", "memory"), default="pipeline")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--volumes", type=int, default=2000)
    parser.add_argument("--no-seed", action="store_true", help="skip the 3-D seed_cnn run (about 6 minutes)")
    args = parser.parse_args()
    print(provenance())
    pipeline(args.rounds, not args.no_seed) if args.what == "pipeline" else memory(args.volumes)


if __name__ == "__main__":
    main()
