"""The pipeline stage by stage without DVC or MLflow: per-stage wall time and the test metrics.

For a machine that has torch and the scientific stack but not DVC or MLflow (a GPU box lent
for a benchmark, say): runs ``python -m pipeline.<stage>`` for every stage of dvc.yaml but
``track`` in a temporary folder, in order, and prints a table a person can paste (wall time,
share and each stage's peak RSS). Relative ``*.path`` params are taken from the current folder.

    python bench/stages.py -S data.source=npz -S data.path=../shared/data/medmnist/pneumoniamnist.npz
    python bench/stages.py -S train.device=cuda -S data.source=npz -S data.path=...   # the same on a GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import REPO, provenance, run_stage, stage_names

from pipeline.core.config import parse_overrides, write_params

SKIPPED = ("track",)  # needs MLflow; what it logs is timed by bench/pipeline_run.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-S", dest="overrides", action="append", default=[], help="params override key=value")
    args = parser.parse_args()
    print(provenance())
    overrides = {k: str(Path(v).resolve()) if k.endswith(".path") and v else v
                 for k, v in parse_overrides(args.overrides).items()}
    measured = {}
    with tempfile.TemporaryDirectory(prefix="medcnn-stages-") as tmp:
        write_params(Path(tmp) / "params.yaml", overrides, REPO / "params.yaml")
        for stage in (s for s in stage_names() if s not in SKIPPED):
            measured[stage] = run_stage(Path(tmp), stage)
            print(f"{stage}: {measured[stage][0]:.1f} s", file=sys.stderr, flush=True)
        test = json.loads((Path(tmp) / "reports/eval/metrics.json").read_text())["test"]
        timing = json.loads((Path(tmp) / "reports/train/timing.json").read_text())
        train = json.loads((Path(tmp) / "reports/train/metrics.json").read_text())["train"]
    total = sum(s for s, _ in measured.values())
    print("| stage | s | share | peak RSS MB |\n|---|---|---|---|")
    for stage, (s, peak) in measured.items():
        print(f"| {stage} | {s:.1f} | {s / total:.0%} | {peak:.0f} |")
    print(f"| total | {total:.1f} | 100% | |")
    print(f"\ntrain: {timing['device']}, {timing['precision']}, {timing['images_per_second']:.0f} images/s, "
          f"best epoch {train['best_epoch']} of {train['epochs_run']}; "
          f"test ROC AUC {test['roc_auc']:.4f}, accuracy {test['accuracy']:.4f}")


if __name__ == "__main__":
    main()
