"""Hyperparameter search, measured: an Optuna study against one full training.

Prepares PneumoniaMNIST (``../shared/data/medmnist/``) in a temporary folder, times one training
with the default params (balance + train), then runs ``python -m pipeline.tune``'s study of
``tune.trials`` trials over the default ``tune.space`` with pruning, on one worker, and prints
its wall time as a multiple of the one training, the trials complete and pruned, and the best
validation value against the default's. The test split is not read by either.

    python bench/tune.py              # 40 trials on PneumoniaMNIST
    python bench/tune.py 10 breastmnist
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
from pathlib import Path

from common import provenance

from pipeline import balance, prepare, train, tune
from pipeline.core.config import load_params, write_params
from pipeline.core.files import fmt

REPO = Path(__file__).resolve().parents[1]
MEDMNIST = REPO.parent / "shared" / "data" / "medmnist"


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    dataset = sys.argv[2] if len(sys.argv) > 2 else "pneumoniamnist"
    print(provenance())
    with tempfile.TemporaryDirectory(prefix="medcnn-bench-tune-") as tmp, contextlib.chdir(tmp):
        params = load_params(write_params(Path(tmp) / "params.yaml", {
            "data.source": "npz", "data.path": str(MEDMNIST / f"{dataset}.npz"), "tune.trials": trials},
            REPO / "params.yaml"))
        prepare.run(params)
        start = time.perf_counter()
        balance.run(params)
        default = train.run(params, checkpoint=None)["train"]
        one = time.perf_counter() - start
        print(f"{dataset} default training: {one:.0f} s, validation ROC AUC {default['val_roc_auc']}", file=sys.stderr,
              flush=True)
        start = time.perf_counter()
        study = tune.run(params, storage=str(Path(tmp) / "optuna.db"), log_mlflow=False,
                         out=Path(tmp) / "best.yaml")
        spent = time.perf_counter() - start
    space = ", ".join(d.key for d in params.tune.space)
    print(f"\n{dataset}, one worker, {trials} trials over {space} (TPE, median pruning), against one training with "
          "the default params:\n")
    print("| one training s | study s | study / one training | complete | pruned | failed | default validation AUC "
          "| best validation AUC |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {one:.0f} | {spent:.0f} | {spent / one:.1f} | {study['complete']} | {study['pruned']} | "
          f"{study['fail']} | {fmt(default['val_roc_auc'])} | {fmt(study['best_value'])} |")
    print(f"\nBest trial {study['best_trial']}: {study['params']}; importance {study['importance']}.")


if __name__ == "__main__":
    main()
