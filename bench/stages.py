"""The pipeline stage by stage without DVC or MLflow: per-stage wall time and the test metrics.

For a machine that has torch and the scientific stack but not DVC or MLflow (a GPU box lent
for a benchmark, say): runs ``python -m pipeline.<stage>`` for every stage of dvc.yaml but
``track`` in a temporary folder, in order, and prints a table a person can paste. Relative
``*.path`` params are taken from the current folder.

    python bench/stages.py -S data.source=npz -S data.path=../shared/data/medmnist/pneumoniamnist.npz
    python bench/stages.py -S train.device=cuda -S data.source=npz -S data.path=...   # the same on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import REPO

from pipeline.core.config import parse_overrides, write_params

SKIPPED = ("track",)  # needs MLflow; what it logs is timed by bench/pipeline_run.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-S", dest="overrides", action="append", default=[], help="params override key=value")
    args = parser.parse_args()
    overrides = {k: str(Path(v).resolve()) if k.endswith(".path") and v else v
                 for k, v in parse_overrides(args.overrides).items()}
    stages = [s for s in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"] if s not in SKIPPED]
    seconds = {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "MEDCNN_LOG_LEVEL": "WARNING"}
    with tempfile.TemporaryDirectory(prefix="medcnn-stages-") as tmp:
        write_params(Path(tmp) / "params.yaml", overrides, REPO / "params.yaml")
        for stage in stages:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", f"pipeline.{stage}"], cwd=tmp, env=env, check=True)
            seconds[stage] = time.perf_counter() - start
            print(f"{stage}: {seconds[stage]:.1f} s", file=sys.stderr, flush=True)
        test = json.loads((Path(tmp) / "reports/eval/metrics.json").read_text())["test"]
        timing = json.loads((Path(tmp) / "reports/train/timing.json").read_text())
        train = json.loads((Path(tmp) / "reports/train/metrics.json").read_text())["train"]
    total = sum(seconds.values())
    print("| stage | s | share |\n|---|---|---|")
    for stage, s in [*seconds.items(), ("total", total)]:
        print(f"| {stage} | {s:.1f} | {s / total:.0%} |")
    print(f"\ntrain: {timing['device']}, {timing.get('precision', 'float32')}, {timing['images_per_second']:.0f} images/s, "
          f"best epoch {train['best_epoch']} of {train['epochs_run']}; "
          f"test ROC AUC {test['roc_auc']:.4f}, accuracy {test['accuracy']:.4f}")


if __name__ == "__main__":
    main()
