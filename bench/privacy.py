"""The privacy-utility table: DP-SGD at ε ∈ {1, 3, 8, ∞} × seeds on PneumoniaMNIST and the phantom.

For each dataset the data are prepared once; then each (ε, seed) trains with the dataset's DP
recipe (``RECIPES``), evaluates (test ROC AUC and accuracy at the validation-chosen threshold)
and runs the membership audit that every evaluate runs. ε = ∞ is the same network, batch size
and schedule trained without DP-SGD, with the project's default optimiser (AdamW): what a user
gets by switching privacy off. Time is the train stage's seconds per epoch relative to ε = ∞.

How the recipes were chosen: on the validation split only (``--tune``: the best epoch's
validation ROC AUC at ε = 8, seed 0, over learning rates and batch sizes), never the test split.
PneumoniaMNIST: lr 1.0 with batches of 256 (validation ROC AUC 0.9872; lr 0.5: 0.9849; batches
of 512: 0.9658 and 0.9676). The phantom takes the same recipe with batches of 128 (its 1,200
training images), not searched separately.

    python bench/privacy.py                         # both datasets, seeds 0 1 2
    python bench/privacy.py pneumoniamnist 0        # one dataset, one seed
    python bench/privacy.py --tune pneumoniamnist   # the validation search behind the recipe
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from common import REPO, provenance

from pipeline import balance, evaluate, prepare, train
from pipeline.core.config import load_params, write_params
from pipeline.core.files import read_json

DATA = REPO.parent / "shared" / "data" / "medmnist"
EPSILONS = (1.0, 3.0, 8.0, math.inf)
SOURCES = {"pneumoniamnist": {"data.source": "npz", "data.path": str(DATA / "pneumoniamnist.npz")},
           "phantom": {"data.source": "phantom"}}
# DP-SGD favours large batches (less noise per image), SGD with momentum, few epochs, the
# weight average (post-processing, free in privacy), and GroupNorm; no augmentation is kept
# where it did not help on validation.
RECIPES: dict[str, dict[str, Any]] = {
    "pneumoniamnist": {"train.norm": "group", "train.optimizer": "sgd", "train.lr": 1.0, "train.momentum": 0.9,
                       "train.batch_size": 256, "train.epochs": 10, "train.patience": 10, "train.schedule": "cosine"},
    "phantom": {"train.norm": "group", "train.optimizer": "sgd", "train.lr": 0.5, "train.momentum": 0.9,
                "train.batch_size": 128, "train.epochs": 10, "train.patience": 10, "train.schedule": "cosine"},
}
# One training thread: on a 2-core machine the two datasets run side by side, one core each
# (``python bench/privacy.py pneumoniamnist & python bench/privacy.py phantom``).
COMMON = {"evaluate.baselines": [], "evaluate.bootstrap": 200, "evaluate.corruptions": [],
          "balance.strategy": "class_weight", "train.threads": 1}
TUNE_GRID = {"train.lr": [0.5, 1.0], "train.batch_size": [256, 512]}


def settings(dataset: str, epsilon: float, seed: int, recipe: dict[str, Any]) -> dict[str, Any]:
    private = math.isfinite(epsilon)
    dp = {"train.privacy.enabled": True, "train.privacy.target_epsilon": epsilon} if private else {
        "train.optimizer": "adamw", "train.lr": 0.003}
    return {**SOURCES[dataset], **COMMON, **recipe, **dp, "seed": seed}


def one_run(overrides: dict[str, Any], prepared: bool) -> dict[str, Any]:
    """Train and evaluate in the current folder (prepare and balance first unless ``prepared``)."""
    params = load_params(write_params(Path("params.yaml"), overrides, REPO / "params.yaml"))
    if not prepared:
        prepare.run(params)
    balance.run(params)
    trained = train.run(params)["train"]
    timing = read_json(Path("reports/train/timing.json"))
    result = evaluate.run(params)
    audit = result["privacy_audit"]["attacks"]
    strongest = max(audit.values(), key=lambda a: a["roc_auc"])
    return {"auc": result["test"]["roc_auc"], "accuracy": result["test"]["accuracy"], "val_auc": trained["val_roc_auc"],
            "epsilon": trained.get("privacy", {}).get("epsilon", math.inf), "attack_auc": strongest["roc_auc"],
            "tpr_1pct": strongest["tpr_at_1pct_fpr"], "seconds_per_epoch": timing["seconds"] / trained["epochs_run"]}


def table(dataset: str, seeds: list[int]) -> list[str]:
    runs: dict[float, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="medcnn-privacy-") as tmp, contextlib.chdir(tmp):
        for i, (epsilon, seed) in enumerate(itertools.product(EPSILONS, seeds)):
            runs.setdefault(epsilon, []).append(one_run(settings(dataset, epsilon, seed, RECIPES[dataset]), i > 0))
            print(f"{dataset} ε={epsilon} seed {seed}: {runs[epsilon][-1]}", file=sys.stderr, flush=True)
    base = np.mean([r["seconds_per_epoch"] for r in runs[math.inf]])

    def stat(rows: list[dict[str, Any]], key: str) -> str:
        values = np.array([np.nan if r[key] is None else r[key] for r in rows], dtype=float)
        return f"{np.nanmean(values):.3f} ± {np.nanstd(values, ddof=1) if len(values) > 1 else 0:.3f}"

    return [f"| {dataset} | {'∞ (no DP)' if math.isinf(e) else f'{e:g}'} | {stat(rows, 'epsilon') if math.isfinite(e) else '–'} "
            f"| {stat(rows, 'auc')} | {stat(rows, 'accuracy')} | {stat(rows, 'attack_auc')} | {stat(rows, 'tpr_1pct')} "
            f"| {np.mean([r['seconds_per_epoch'] for r in rows]) / base:.2f} |" for e, rows in runs.items()]


def tune(dataset: str) -> None:
    """Validation ROC AUC at ε = 8, seed 0, over ``TUNE_GRID`` around the recipe."""
    print("| " + " | ".join(TUNE_GRID) + " | best val ROC AUC |\n|" + "---|" * (len(TUNE_GRID) + 1))
    with tempfile.TemporaryDirectory(prefix="medcnn-privacy-tune-") as tmp, contextlib.chdir(tmp):
        for i, values in enumerate(itertools.product(*TUNE_GRID.values())):
            change = dict(zip(TUNE_GRID, values))
            params = load_params(write_params(Path("params.yaml"), {**settings(dataset, 8.0, 0, RECIPES[dataset]),
                                                                    **change}, REPO / "params.yaml"))
            if i == 0:
                prepare.run(params)
            balance.run(params)
            print(f"| {' | '.join(map(str, values))} | {train.run(params)['train']['val_roc_auc']:.4f} |", flush=True)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tune", action="store_true", help="search the recipe on validation instead")
    parser.add_argument("targets", nargs="*", help="dataset names (pneumoniamnist, phantom) and seeds")
    args = parser.parse_args()
    print(provenance())
    datasets = [a for a in args.targets if not a.isdigit()] or list(RECIPES)
    if args.tune:
        for dataset in datasets:
            tune(dataset)
        return
    seeds = [int(a) for a in args.targets if a.isdigit()] or [0, 1, 2]
    lines = [line for dataset in datasets for line in table(dataset, seeds)]
    print("| dataset | target ε | ε spent | test ROC AUC | test accuracy | attack ROC AUC | attack TPR at 1% FPR "
          "| train time per epoch vs no DP |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(lines))
    print(f"({len(seeds)} seed(s) each: mean ± sd; attack = the stronger of the two membership attacks)")


if __name__ == "__main__":
    main()
