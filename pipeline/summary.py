"""Print a short summary after ``make run``: test metrics, where the report, MLflow run and model are."""

from __future__ import annotations

import sys
from typing import Any

from pipeline.core import paths
from pipeline.core.files import read_json
from pipeline.evaluation.metrics import COMPARISON


def audit_auc(evaluation: dict[str, Any]) -> str:
    """The stronger membership attack's ROC AUC."""
    attacks = evaluation["privacy_audit"]["attacks"]
    return f"{max(a['roc_auc'] for a in attacks.values()):.3f} (0.5: no leakage)"


def main() -> None:
    try:
        evaluation = read_json(paths.EVAL_DIR / paths.METRICS)
        test = evaluation["test"]
        train = read_json(paths.TRAIN_DIR / paths.METRICS)["train"]
        run = read_json(paths.MLFLOW_RUN)
    except FileNotFoundError as exc:
        print(f"error: {exc.filename} not found; run `dvc repro` first", file=sys.stderr)
        sys.exit(1)
    print("\nmedcnn summary")
    print(f"  model: {train['parameters']} parameters, best epoch {train['best_epoch']} of {train['epochs_run']}")
    for key in COMPARISON:
        value = test[key]
        print(f"  test {key:<18} {'n/a' if value is None else f'{value:.4f}'}")
    spent = train.get("privacy")
    guarantee = f"DP-SGD, ε = {spent['epsilon']:.3g} at δ = {spent['delta']:.2g}" if spent else "no DP-SGD"
    print(f"  privacy: {guarantee}; membership attack ROC AUC {audit_auc(evaluation)}")
    print(f"  report:  {paths.REPORT_HTML.resolve()}")
    print(f"  MLflow:  run {run['run_id']} in {run['tracking_uri']}")
    if "model_version" in run:
        print(f"           model '{run['registered_model']}' version {run['model_version']} "
              "(make it the champion: python -m pipeline.promote)")
    print("           browse with `make ui`: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning")
    print(f"  predict: medcnn-predict <images> -o predictions.csv (uses {paths.MODEL})")


if __name__ == "__main__":
    main()
