"""Stage 2, balance: handle class imbalance on the training split only.

Writes ``data/balanced/`` (the training rows to train on, in order; SMOTE's synthetic images
and labels, empty otherwise; loss weights per class, all 1 unless ``class_weight``) and
``reports/balance.json`` with before/after counts. Validation and test are never touched.
The strategies themselves are in :mod:`pipeline.data.resampling`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core import paths
from pipeline.core.config import Params
from pipeline.core.dataset import load_meta, load_split, save_balanced
from pipeline.core.files import staged_dir, write_json
from pipeline.core.runtime import stage_main
from pipeline.data.labels import counts
from pipeline.data.resampling import class_weights, resample

log = logging.getLogger(__name__)


def run(params: Params, prepared: Path = paths.PREPARED, out_dir: Path = paths.BALANCED,
        report_path: Path = paths.BALANCE_REPORT) -> dict[str, Any]:
    meta = load_meta(prepared)
    train = load_split(prepared, "train")
    labels = train["labels"]
    strategy = params.balance.strategy
    indices, synthetic, synthetic_labels = resample(strategy, train["images"], labels, params.seed,
                                                    params.balance.smote_k_neighbors)
    weights = class_weights(strategy, labels, meta["num_classes"])
    names = meta["class_names"]
    after = np.concatenate([labels[indices], synthetic_labels])
    report = {
        "strategy": strategy,
        "before": counts(labels, names),  # multi-label: images with each finding
        "after": counts(after, names),
        "class_weights": dict(zip(names, weights)),  # multi-label: each finding's positive weight
        "synthetic_images": int(len(synthetic_labels)),
        "n_before": int(len(labels)),
        "n_after": int(len(after)),
    }
    with staged_dir(out_dir) as tmp:
        save_balanced(tmp, indices, synthetic, synthetic_labels, weights)
    write_json(report_path, report)
    log.info("balance=%s: %s -> %s", strategy, report["before"], report["after"])
    return report


def main() -> None:
    stage_main(__doc__.splitlines()[0], run)


if __name__ == "__main__":
    main()
