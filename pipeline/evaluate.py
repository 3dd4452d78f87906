"""Stage 4, evaluate: the trained model on the held-out test split.

Writes ``reports/eval/``:
- ``metrics.json`` (DVC metrics): accuracy (the seed's metric), balanced accuracy, ROC AUC
  (one-vs-rest macro for multi-class), sensitivity, specificity, F1, confusion matrix;
- ``predictions.csv`` (DVC confusion plot): id, true label, one probability per class,
  prediction: enough for a reviewer to recompute every number;
- ``roc.csv`` (DVC ROC plot): false/true positive rate per threshold (one curve per class
  for multi-class tasks);
- ``roc.png`` and ``confusion.png`` for offline readers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from pipeline import paths
from pipeline.errors import PipelineError
from pipeline.files import write_csv, write_json
from pipeline.metrics import classification_metrics, confusion_matrix
from pipeline.models import load_checkpoint, predict_proba
from pipeline.params import Params
from pipeline.plots import plot_confusion, plot_roc
from pipeline.splits import load_meta, load_split
from pipeline.runtime import configure_torch, stage_main

log = logging.getLogger(__name__)


def roc_curves(labels: np.ndarray, probs: np.ndarray, class_names: list[str],
               positive_class: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Binary: one curve for ``positive_class``; multi-class: one-vs-rest per present class."""
    classes = [positive_class] if probs.shape[1] == 2 else [k for k in range(probs.shape[1]) if (labels == k).any()]
    curves = {}
    for k in classes:
        fpr, tpr, thresholds = roc_curve(labels == k, probs[:, k])
        curves[class_names[k]] = (fpr, tpr, np.minimum(thresholds, 1.0))  # sklearn's first threshold is inf
    return curves


def run(params: Params, prepared: Path = paths.PREPARED, model_path: Path = paths.MODEL,
        out_dir: Path = paths.EVAL_DIR) -> dict[str, Any]:
    configure_torch(params.train.threads)
    meta = load_meta(prepared)
    names = meta["class_names"]
    positive = params.evaluate.positive_class
    if positive >= len(names):
        raise PipelineError(f"evaluate.positive_class={positive} but the data have {len(names)} classes")
    model, _ = load_checkpoint(model_path)
    test = load_split(prepared, "test")
    labels = test["labels"]
    probs = predict_proba(model, test["images"], batch_size=params.evaluate.batch_size)
    scores = classification_metrics(labels, probs, positive)
    matrix = confusion_matrix(labels, probs)
    result = {"test": {**scores, "confusion_matrix": matrix}}
    preds = probs.argmax(axis=1)
    header = ["id", "label", *[f"prob_{n}" for n in names], "prediction"]
    rows = [[i, names[y], *[f"{p:.6f}" for p in row], names[pred]] for i, y, row, pred in zip(test["ids"], labels, probs, preds)]
    curves = roc_curves(labels, probs, names, positive)
    roc_rows = [[name, f"{a:.6f}", f"{b:.6f}", f"{t:.6f}"] for name, (fpr, tpr, thr) in curves.items()
                for a, b, t in zip(fpr, tpr, thr)]
    write_json(out_dir / "metrics.json", result)
    write_csv(out_dir / "predictions.csv", header, rows)
    write_csv(out_dir / "roc.csv", ["class", "fpr", "tpr", "threshold"], roc_rows)
    aucs = {name: float(np.trapezoid(tpr, fpr)) for name, (fpr, tpr, _) in curves.items()}
    plot_roc({name: (fpr, tpr, aucs[name]) for name, (fpr, tpr, _) in curves.items()}, out_dir / "roc.png")
    plot_confusion(matrix, names, out_dir / "confusion.png")
    log.info("test: " + ", ".join(f"{k} {v}" for k, v in scores.items()))
    return result


def main() -> None:
    stage_main(__doc__.splitlines()[0], run)


if __name__ == "__main__":
    main()
