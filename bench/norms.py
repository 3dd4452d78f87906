"""Recipes for group normalisation, chosen on validation: which defaults make ``train.norm=group`` learn?

``train.norm=group`` is what DDP with exact one-process equivalence and DP-SGD need, but with the
batch-norm recipe (AdamW, lr 0.003, no warm-up) it barely learns on BreastMNIST. For each
candidate recipe and seed this trains on BreastMNIST's training split and prints the best
epoch's validation ROC AUC (what chooses the recipe) beside the test ROC AUC at the
validation-chosen threshold (what the choice is then measured by; it chooses nothing).

    python bench/norms.py              # every recipe, seeds 0 1 2
    python bench/norms.py phantom      # the phantom instead
    python bench/norms.py breastmnist "batch norm (default)" "group, auto, 2 processes"   # some recipes

"2 processes" trains with ``train.processes: 2`` (DDP under torchrun, gloo, one thread each), as
``python -m pipeline.train`` does.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import REPO, provenance

from pipeline import balance, evaluate, prepare, train
from pipeline.core.config import load_params, write_params
from pipeline.core.files import fmt, read_json
from pipeline.modeling import distributed

DATA = REPO.parent / "shared" / "data" / "medmnist"
# Every value explicit: train.warmup_epochs and train.grad_clip default to auto, which is itself
# one of these recipes for group norm.
GROUP = {"train.norm": "group", "train.warmup_epochs": 0, "train.grad_clip": 0.0}
RECIPES: dict[str, dict[str, Any]] = {
    "batch norm (default)": {},
    "group, batch-norm recipe": GROUP,
    "group, lr 0.001": {**GROUP, "train.lr": 0.001},
    "group, warm-up 2": {**GROUP, "train.warmup_epochs": 2},
    "group, lr 0.001, warm-up 2": {**GROUP, "train.lr": 0.001, "train.warmup_epochs": 2},
    "group, warm-up 2, clip 1 (auto)": {"train.norm": "group"},
    "group, lr 0.001, warm-up 2, clip 1": {**GROUP, "train.lr": 0.001, "train.warmup_epochs": 2,
                                           "train.grad_clip": 1.0},
    "group, auto, 2 processes": {"train.norm": "group", "train.processes": 2},
}
FAST = {"evaluate.baselines": [], "evaluate.corruptions": [], "evaluate.bootstrap": 100}


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    dataset = sys.argv[1] if len(sys.argv) > 1 else "breastmnist"
    chosen = sys.argv[2:] or list(RECIPES)
    source = {} if dataset == "phantom" else {"data.source": "npz", "data.path": str(DATA / f"{dataset}.npz")}
    seeds = (0, 1, 2)
    print(provenance())
    rows = []
    with tempfile.TemporaryDirectory(prefix="medcnn-bench-norms-") as tmp, contextlib.chdir(tmp):
        for name, recipe in ((n, RECIPES[n]) for n in chosen):
            val, test, seconds = [], [], []
            for seed in seeds:
                params = load_params(write_params(Path(tmp) / "params.yaml", {**source, **FAST, **recipe,
                                                                              "seed": seed}, REPO / "params.yaml"))
                if not source or not Path("data/prepared").is_dir():  # the phantom's scans follow the seed
                    prepare.run(params)
                start = time.perf_counter()
                balance.run(params)
                if params.train.processes > 1:
                    if distributed.launch(params.train.processes, "pipeline.train", Path("params.yaml")):
                        raise SystemExit(f"{name} seed {seed}: training failed")
                    val.append(read_json(Path("reports/train/metrics.json"))["train"]["val_roc_auc"])
                else:
                    val.append(train.run(params, checkpoint=None)["train"]["val_roc_auc"])
                seconds.append(time.perf_counter() - start)
                test.append(evaluate.run(params)["test"]["roc_auc"])
                print(f"{dataset} {name} seed {seed}: validation {val[-1]}, test {test[-1]}", file=sys.stderr,
                      flush=True)
            rows.append((name, val, test, seconds))
    print(f"\n{dataset}, seeds {', '.join(map(str, seeds))}: best-epoch validation ROC AUC (chooses the recipe) and "
          "test ROC AUC (measures it):\n")
    print("| recipe | validation ROC AUC, mean | per seed | test ROC AUC, mean | per seed | train s, mean |")
    print("|---|---|---|---|---|---|")
    for name, val, test, seconds in rows:
        print(f"| {name} | {fmt(round(float(np.mean(val)), 4))} | {' / '.join(fmt(v) for v in val)} | "
              f"{fmt(round(float(np.mean(test)), 4))} | {' / '.join(fmt(v) for v in test)} | {np.mean(seconds):.0f} |")


if __name__ == "__main__":
    main()
