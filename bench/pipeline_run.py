"""Time `dvc repro` end to end and check that a forced rerun gives the same bytes.

Runs in a temporary git copy of the project (your workspace, store and outputs are left
alone). Usage, from the repository root inside the venv:

    python bench/pipeline_run.py                       # default params (phantom)
    python bench/pipeline_run.py -S data.source=npz -S data.path=../shared/data/medmnist/pneumoniamnist.npz

Prints wall time, test metrics, and whether `models/model.pt` and `reports/eval/metrics.json`
are byte-identical after `dvc repro -f`.

``--compare REV`` instead times this tree's pipeline beside commit REV's (``git archive``),
both with the same overrides, stage by stage (`dvc repro -f -s`), rounds alternating
(``--rounds``, 2 by default), and prints each stage's mean seconds and share, the ratio, and
each side's test ROC AUC: nothing gets slower unnoticed.

    python bench/pipeline_run.py --compare v0.1.0     # any git revision: a tag, a branch, HEAD~3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import tempfile
import time
from pathlib import Path

from common import alternate, print_stage_table, provenance

from pipeline.core.config import parse_overrides
from pipeline.core.workspace import copy_project

TREE = "this tree"  # what --compare times beside the revision: the working tree, as git sees it
CHECKED = ("models/model.pt", "reports/eval/metrics.json", "reports/train/history.csv")


def digests(root: Path) -> dict[str, str]:
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in CHECKED}


def compare(revision: str, overrides: dict[str, object], rounds: int) -> None:
    """Per-stage wall time of this tree's pipeline and ``revision``'s, side by side."""
    with tempfile.TemporaryDirectory(prefix="medcnn-compare-") as tmp:
        (Path(tmp) / "revision").mkdir()
        (Path(tmp) / "tree").mkdir()
        copies = {revision: (Path(tmp) / "revision", copy_project(Path(tmp) / "revision", overrides, revision)),
                  TREE: (Path(tmp) / "tree", copy_project(Path(tmp) / "tree", overrides))}
        mean = alternate(copies, rounds)
        auc = {name: json.loads((root / "reports/eval/metrics.json").read_text())["test"]["roc_auc"]
               for name, (root, _) in copies.items()}
    print_stage_table(revision, mean[revision], TREE, mean[TREE], rounds)
    print(f"\ntest ROC AUC: {revision} {auc[revision]:.4f}, {TREE} {auc[TREE]:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-S", dest="overrides", action="append", default=[], help="params override key=value")
    parser.add_argument("--no-rerun", action="store_true", help="skip the forced determinism rerun")
    parser.add_argument("--compare", metavar="REV", help="time REV's pipeline beside this tree's, stage by stage")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds for --compare")
    args = parser.parse_args()
    print(provenance())
    if args.compare:
        compare(args.compare, parse_overrides(args.overrides), args.rounds)
        return
    with tempfile.TemporaryDirectory(prefix="medcnn-bench-") as tmp:
        root = Path(tmp)
        env = copy_project(root, parse_overrides(args.overrides))
        start = time.perf_counter()
        subprocess.run(["dvc", "repro"], cwd=root, env=env, check=True, capture_output=True)
        wall = time.perf_counter() - start
        first = digests(root)
        test = json.loads((root / "reports/eval/metrics.json").read_text())["test"]
        train = json.loads((root / "reports/train/metrics.json").read_text())["train"]
        train_time = json.loads((root / "reports/train/timing.json").read_text())["seconds"]
        rows = [("params", " ".join(args.overrides) or "defaults"), ("dvc repro wall (s)", f"{wall:.1f}"),
                ("of which train (s)", f"{train_time:.1f}"), ("epochs run / best", f"{train['epochs_run']} / {train['best_epoch']}")]
        rows += [(f"test {k}", f"{test[k]:.4f}") for k in ("roc_auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity")]
        if not args.no_rerun:
            subprocess.run(["dvc", "repro", "-f"], cwd=root, env=env, check=True, capture_output=True)
            second = digests(root)
            rows += [(f"identical after repro -f: {n}", str(first[n] == second[n])) for n in CHECKED]
    print("| run | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name.strip()} | {value} |")


if __name__ == "__main__":
    main()
