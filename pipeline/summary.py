"""Print a short summary after ``make run``: test metrics, where the report and MLflow run are."""

from __future__ import annotations

import sys

from pipeline import paths
from pipeline.files import read_json


def main() -> None:
    try:
        test = read_json(paths.EVAL_DIR / "metrics.json")["test"]
        train = read_json(paths.TRAIN_DIR / "metrics.json")["train"]
        run = read_json(paths.MLFLOW_RUN)
    except FileNotFoundError as exc:
        print(f"error: {exc.filename} not found; run `dvc repro` first", file=sys.stderr)
        sys.exit(1)
    print("\nmedcnn summary")
    print(f"  model: {train['parameters']} parameters, best epoch {train['best_epoch']} of {train['epochs_run']}")
    for key in ("roc_auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1"):
        value = test[key]
        print(f"  test {key:<18} {'n/a' if value is None else f'{value:.4f}'}")
    print(f"  report:  {paths.REPORT_HTML.resolve()}")
    print(f"  MLflow:  run {run['run_id']} in {run['tracking_uri']}")
    print("           browse with `make ui` (mlflow ui --backend-store-uri sqlite:///mlflow.db)")


if __name__ == "__main__":
    main()
