"""Data-parallel training: images per second with 1 and 2 processes (PyTorch DDP under torchrun).

Prepares the default phantom once in a temporary folder, then runs the real train stage with
``train.processes`` 1 and 2 (``train.threads`` shared between them), GroupNorm and BatchNorm,
three epochs each, and prints the training throughput from ``reports/train/timing.json``
with the validation AUC. On a 2-core CPU two processes of one thread each do the work of one
process of two threads: expect little gain there; the point of DDP is several GPUs or hosts.
``-S key=value`` overrides params (e.g. ``-S train.device=cuda`` on a GPU machine).

    python bench/ddp.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO

from pipeline import balance, prepare
from pipeline.core.config import load_params, parse_overrides, write_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-S", dest="overrides", action="append", default=[], help="params override key=value")
    args = parser.parse_args()
    base = {"train.epochs": 3, "train.patience": 3, **parse_overrides(args.overrides)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="medcnn-ddp-") as tmp, contextlib.chdir(tmp):
        params = load_params(write_params(Path("params.yaml"), base, REPO / "params.yaml"))
        prepare.run(params)
        balance.run(params)
        for norm in ("group", "batch"):
            for processes in (1, 2):
                write_params(Path("params.yaml"), {**base, "train.norm": norm, "train.processes": processes},
                             REPO / "params.yaml")
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "pipeline.train"], check=True, capture_output=True)
                wall = time.perf_counter() - start
                timing = json.loads(Path("reports/train/timing.json").read_text())
                auc = json.loads(Path("reports/train/metrics.json").read_text())["train"]["val_roc_auc"]
                rows.append((norm, processes, params.train.threads // processes, timing["images_per_second"], wall, auc))
                print(f"{norm} × {processes}: {timing['images_per_second']} img/s", file=sys.stderr, flush=True)
    print("| norm | processes | threads each | train images/s | stage wall s | best val ROC AUC |")
    print("|---|---|---|---|---|---|")
    for norm, processes, threads, speed, wall, auc in rows:
        print(f"| {norm} | {processes} | {threads} | {speed:.0f} | {wall:.0f} | {auc:.4f} |")


if __name__ == "__main__":
    main()
