"""Every imbalance strategy with the same network and seed: a table of test metrics and time.

Strategies: the balance stage's ``none``, ``class_weight``, ``oversample``, ``undersample``,
``smote``, and the training-time ``train.sampler: weighted`` and ``train.loss: focal``. Runs
prepare once per dataset, then balance → train → evaluate per strategy (without the classical
baselines), in a temporary folder.

    python bench/imbalance.py                      # PneumoniaMNIST and the phantom
    python bench/imbalance.py phantom              # one dataset
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
from pathlib import Path
from common import provenance

from pipeline import balance, evaluate, prepare, train
from pipeline.core.config import load_params, write_params

REPO = Path(__file__).resolve().parents[1]
DATASETS = {
    "pneumoniamnist": {"data.source": "npz", "data.path": str(REPO.parent / "shared/data/medmnist/pneumoniamnist.npz")},
    "phantom": {},
}
STRATEGIES = {
    "none": {"balance.strategy": "none"},
    "class_weight": {"balance.strategy": "class_weight"},
    "oversample": {"balance.strategy": "oversample"},
    "undersample": {"balance.strategy": "undersample"},
    "smote": {"balance.strategy": "smote"},
    "weighted sampler": {"balance.strategy": "none", "train.sampler": "weighted"},
    "focal loss": {"balance.strategy": "none", "train.loss": "focal"},
}
FAST_EVAL = {"evaluate.baselines": [], "evaluate.bootstrap": 200}


def params_for(folder: Path, overrides: dict):
    return load_params(write_params(folder / "params.yaml", overrides, REPO / "params.yaml"))


def main() -> None:
    print(provenance())
    logging.basicConfig(level=logging.WARNING)
    chosen = sys.argv[1:] or list(DATASETS)
    rows = []
    for dataset in chosen:
        with tempfile.TemporaryDirectory(prefix="medcnn-imbalance-") as tmp, contextlib.chdir(tmp):
            prepare.run(params_for(Path(tmp), {**DATASETS[dataset], **FAST_EVAL}))
            for name, strategy in STRATEGIES.items():
                params = params_for(Path(tmp), {**DATASETS[dataset], **FAST_EVAL, **strategy})
                start = time.perf_counter()
                balance.run(params)
                train.run(params)
                seconds = time.perf_counter() - start
                test = evaluate.run(params)["test"]
                rows.append((dataset, name, test["roc_auc"], test["balanced_accuracy"], test["g_mean"],
                             test["sensitivity"], test["specificity"], seconds))
                print(f"{dataset} {name}: AUC {test['roc_auc']:.4f}", file=sys.stderr, flush=True)
    print("| dataset | strategy | ROC AUC | balanced acc. | G-mean | sensitivity | specificity | balance+train s |")
    print("|---|---|---|---|---|---|---|---|")
    for dataset, name, *values, seconds in rows:
        print(f"| {dataset} | {name} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {seconds:.0f} |")


if __name__ == "__main__":
    main()
