"""What the portable CPU kernels cost: the pipeline in portable and in native mode, side by side.

Two temporary copies of the project with the same params, one run with the default
``MEDCNN_KERNELS=portable`` and one with ``native`` (see ``pipeline/core/kernels.py``), stage by
stage (`dvc repro -f -s`), rounds alternating so the machine's drift touches both alike. Prints
each stage's mean seconds and the native / portable ratio (`dvc repro` in all, and train), then
the trained network's md5 in each mode and the CPU it ran on.

    python bench/kernels.py                  # default params, 2 rounds
    python bench/kernels.py --rounds 3 -S data.source=npz -S data.path=../shared/data/medmnist/pneumoniamnist.npz
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

from common import alternate, print_stage_table, provenance

from pipeline.core import kernels
from pipeline.core.config import parse_overrides
from pipeline.core.workspace import copy_project

MODES = ("portable", "native")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-S", dest="overrides", action="append", default=[], help="params override key=value")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    args = parser.parse_args()
    print(provenance())
    with tempfile.TemporaryDirectory(prefix="medcnn-kernels-") as tmp:
        copies = {}
        for mode in MODES:
            root = Path(tmp) / mode
            env = copy_project(root, parse_overrides(args.overrides))
            copies[mode] = (root, {**env, kernels.MODE_VARIABLE: mode})
        mean = alternate(copies, args.rounds)
        network = {mode: hashlib.md5((root / "models/network.pt").read_bytes()).hexdigest()
                   for mode, (root, _) in copies.items()}
        trained = {mode: json.loads((root / "reports/train/timing.json").read_text())["kernels"]
                   for mode, (root, _) in copies.items()}
    print_stage_table("portable", mean["portable"], "native", mean["native"], args.rounds)
    print()
    print("| mode | models/network.pt md5 | ATen | oneDNN max ISA | MKL_CBWR | numpy SIMD | OpenBLAS |")
    print("|---|---|---|---|---|---|---|")
    for mode in MODES:
        k = trained[mode]
        print(f"| {mode} | {network[mode]} | {k['aten_capability']} | {k['onednn_max_cpu_isa']} | {k['mkl_cbwr']} | "
              f"{k['numpy_simd']} | {k['openblas']} |")
    print(f"\nCPU: {trained['portable']['cpu']} ({trained['portable']['cpu_flags']}), "
          f"{trained['portable']['threads']} thread(s)")


if __name__ == "__main__":
    main()
