"""Stage 3 of a cross-validation, ``fold@<n>``: one fold model of ``cv.folds``.

DVC's ``matrix`` makes one such stage per entry of ``cv.folds`` (none for the single split),
so a fold reruns alone when only it changed and ``dvc metrics show`` lists every fold. Fold
``n`` trains on the development images (train + val) of every other fold and is validated on
its own held-out fold, exactly as the train stage trains on the single split: the balance
stage's strategy applied to its training images, early stopping on its held-out fold, then
the temperature (``evaluate.calibrate``) and threshold (``evaluate.threshold``) fitted there.

Folds are whole patients, stratified and seeded (:func:`pipeline.data.patient_split.cv_folds`);
the assignment is recomputed from the prepared data wherever it is needed, never stored.
The fold's training and validation images are copied, row by row, to a temporary folder the
train stage reads like ``data/prepared`` (a small cohort's development set: kilobytes to
megabytes); it is deleted when the fold ends.

Writes ``models/folds/<n>/network.pt`` and ``reports/folds/<n>/``: the train stage's files
(``history.csv``, ``curves.png``, ``timing.json``) and ``metrics.json`` with the train stage's
``train`` entry and the fold's own (``fold``: sizes, temperature, threshold and its held-out
metrics at that threshold). The train stage then averages the folds into one ensemble.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import balance, tasks, train
from pipeline.core import paths
from pipeline.core.config import Params
from pipeline.core.dataset import LARGE, array_path, load_meta, load_split, save_meta
from pipeline.core.errors import PipelineError
from pipeline.core.files import NpyWriter, rounded, save_npy, write_json
from pipeline.core.runtime import stage_main
from pipeline.data.patient_split import development_folds
from pipeline.evaluation.metrics import classification_metrics
from pipeline.modeling.checkpoints import load_checkpoint
from pipeline.modeling.networks import predict_proba

log = logging.getLogger(__name__)


def write_view(dev: dict[str, Any], rows: dict[str, np.ndarray], out: Path) -> None:
    """``out/<split>/*.npy`` holding the development rows ``rows[split]``, as prepare writes a split."""
    for split, index in rows.items():
        for name, value in dev.items():
            if name in LARGE:
                writer = NpyWriter(array_path(out, split, name), value.dtype, value.shape[1:])
                for i in index:
                    writer.append(value[int(i)])
                writer.close()
            else:
                save_npy(array_path(out, split, name), value[index])


def run(params: Params, fold: int, prepared: Path = paths.PREPARED, models: Path = paths.FOLD_MODELS,
        reports: Path = paths.FOLD_REPORTS) -> dict[str, Any]:
    if fold not in params.cv.folds:
        raise PipelineError(f"fold {fold} is not one of cv.folds {list(params.cv.folds)}")
    meta = load_meta(prepared)
    task = tasks.for_data(meta.get("task"), meta["class_names"])
    if task.family != "single":
        raise PipelineError(f"cv.folds: cross-validation ensembles binary and multi-class tasks; this data is "
                            f"{task.name} (use cv.folds: [])")
    if params.train.processes != 1 or params.train.privacy.enabled:
        raise PipelineError("cv.folds trains each fold in one process and without train.privacy (every image trains "
                            "k-1 of the k members, so their guarantees would compose): set train.processes: 1 and "
                            "train.privacy.enabled: false")
    dev, folds = development_folds(prepared, params.cv.k, params.seed)
    rows = {"train": np.flatnonzero(folds != fold), "val": np.flatnonzero(folds == fold)}
    log.info("fold %d of %d: training on %d development images, holding out %d", fold, params.cv.k,
             len(rows["train"]), len(rows["val"]))
    model_path, out_dir = models / str(fold) / paths.NETWORK.name, reports / str(fold)
    with tempfile.TemporaryDirectory(prefix=f"medcnn-fold{fold}-") as tmp:
        view = Path(tmp)
        write_view(dev, rows, view)
        save_meta(view, meta)
        balance.run(params, prepared=view, out_dir=view / "balanced", report_path=view / "balance.json")
        metrics = train.run(params, prepared=view, balanced=view / "balanced", model_path=model_path,
                            out_dir=out_dir, checkpoint=paths.CHECKPOINT.with_name(f"fold-{fold}.pt"))
        held_out = load_split(view, "val")
        network, _ = load_checkpoint(model_path)
        raw = predict_proba(network, held_out["images"], params.evaluate.batch_size, activation=task.probabilities)
    labels, cfg = held_out["labels"], params.evaluate
    temperature = task.fit_temperature(cfg.calibrate, labels, raw)
    probs = task.calibrate(raw, temperature)
    threshold = task.thresholds(cfg.threshold, labels, probs, cfg.positive_class)
    scores = classification_metrics(labels, probs, cfg.positive_class, threshold)
    metrics["fold"] = {"fold": fold, "of": params.cv.k, "train_images": len(rows["train"]),
                       "held_out_images": len(labels), "temperature": temperature, "threshold": threshold,
                       **{key: rounded(scores[key]) for key in ("roc_auc", "accuracy", "sensitivity", "specificity")
                          if key in scores}}
    write_json(out_dir / paths.METRICS, metrics)
    log.info("fold %d: held-out ROC AUC %s at temperature %s, threshold %s", fold, metrics["fold"]["roc_auc"],
             temperature, threshold)
    return metrics


def main() -> None:
    stage_main(__doc__.splitlines()[0], run, ("fold", int, "the fold's number, one of cv.folds"))


if __name__ == "__main__":
    main()
