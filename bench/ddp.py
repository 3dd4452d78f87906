"""Training throughput: 1 and 2 data-parallel processes (PyTorch DDP under torchrun), and on a
GPU machine the GPU against its CPU, bf16 against float32.

Prepares the default phantom once in a temporary folder, then runs the real train stage (three
epochs) once per row and prints the throughput from ``reports/train/timing.json`` with the
best validation AUC. ``-S key=value`` overrides params in every row.

    python bench/ddp.py          # CPU: GroupNorm and BatchNorm × 1 and 2 processes (gloo)
    python bench/ddp.py --gpu    # CPU (all cores) vs CUDA float32 vs bf16, NCHW vs channels last, workers, NCCL
    python bench/ddp.py --gpu --no-cpu-row -S data.phantom.image_size=128 -S train.width=32   # GPU-sized

On a 2-core CPU two processes of one thread each do the work of one process of two threads:
expect little gain there; the point of DDP is several GPUs or hosts. ``--gpu`` gives every row
``train.threads`` = all cores (at most 8: augmentation runs on the CPU) and trains with
GroupNorm, so the 2-process row sees the same model as the others; with one GPU both of its
workers share it, which NCCL may refuse (the row then shows the error).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, provenance

from pipeline import balance, prepare
from pipeline.core.config import load_params, parse_overrides, write_params

COLUMNS = ("device", "precision", "layout", "norm", "processes", "workers", "threads each")


def cpu_rows() -> list[dict[str, object]]:
    return [{"train.norm": norm, "train.processes": processes} for norm in ("group", "batch") for processes in (1, 2)]


def gpu_rows(cpu: bool) -> list[dict[str, object]]:
    threads = min(8, os.cpu_count() or 1)
    row = {"train.norm": "group", "train.threads": threads}
    return [*([{**row, "train.device": "cpu"}] if cpu else []),
            {**row, "train.device": "cuda", "train.precision": "float32"},
            {**row, "train.device": "cuda", "train.precision": "float32", "train.channels_last": True},
            {**row, "train.device": "cuda", "train.precision": "bf16"},
            {**row, "train.device": "cuda", "train.precision": "bf16", "train.channels_last": True},
            {**row, "train.device": "cuda", "train.precision": "bf16", "train.workers": 2},
            {**row, "train.device": "cuda", "train.precision": "bf16", "train.processes": 2}]


def first_error(stderr: str) -> str:
    """The first line that names an error (a worker's, not torchrun's summary), for a table cell."""
    found = [line.strip() for line in stderr.splitlines()
             if (line.startswith("error:") or re.search(r"\w(Error|Exception):", line)) and "ChildFailedError" not in line]
    return (found[0] if found else stderr.strip()[-120:])[:160].replace("|", "/")


def train_once(base: dict[str, object], row: dict[str, object]) -> list[str]:
    """The row's table cells after one run of the train stage in the current folder: device and
    precision as the run recorded them (as asked, when it failed)."""
    params = load_params(write_params(Path("params.yaml"), {**base, **row}, REPO / "params.yaml")).train
    setup = ["channels last" if params.channels_last else "NCHW", params.norm, str(params.processes), str(params.workers),
             str(params.threads // params.processes)]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline.train"], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode:
        print(done.stderr[-3000:], file=sys.stderr)
        return [params.device, params.precision, *setup, "failed", f"{wall:.0f}", first_error(done.stderr)]
    timing = json.loads(Path("reports/train/timing.json").read_text())
    auc = json.loads(Path("reports/train/metrics.json").read_text())["train"]["val_roc_auc"]
    return [timing["device"], timing["precision"], *setup, f"{timing['images_per_second']:.0f}", f"{wall:.0f}",
            f"{auc:.4f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-S", dest="overrides", action="append", default=[], help="params override key=value")
    parser.add_argument("--gpu", action="store_true", help="CPU vs CUDA, bf16 vs float32, workers, NCCL")
    parser.add_argument("--no-cpu-row", action="store_true", help="with --gpu: GPU rows only (for GPU-sized settings)")
    args = parser.parse_args()
    print(provenance())
    base = {"train.epochs": 3, "train.patience": 3, **parse_overrides(args.overrides)}
    rows = gpu_rows(not args.no_cpu_row) if args.gpu else cpu_rows()
    table = []
    with tempfile.TemporaryDirectory(prefix="medcnn-ddp-") as tmp, contextlib.chdir(tmp):
        params = load_params(write_params(Path("params.yaml"), base, REPO / "params.yaml"))
        prepare.run(params)
        balance.run(params)
        for row in rows:
            table.append(train_once(base, row))
            print(" ".join(table[-1]), file=sys.stderr, flush=True)
    print(f"| {' | '.join(COLUMNS)} | train images/s | stage wall s | best val ROC AUC |")
    print("|" + "---|" * (len(COLUMNS) + 3))
    for cells in table:
        print(f"| {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
