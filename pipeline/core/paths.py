"""Where each stage reads and writes, relative to the repository root (DVC's working dir).

Every output file name lives here, once; these are the paths ``dvc.yaml`` declares. Stages
take folders as arguments defaulting to these, so tests can point a stage at a temporary
folder instead, and write the file names below inside them.
"""

from pathlib import Path

PARAMS = Path("params.yaml")
DVC_LOCK = Path("dvc.lock")

# File names shared by several stage folders.
METRICS = "metrics.json"
TIMING = "timing.json"

SOURCE = Path("data/source.json")  # the source stage's fingerprint of the input
EXTERNAL_SOURCE = Path("data/external.json")  # ... and of the external validation sets' inputs
PREPARED = Path("data/prepared")
BALANCED = Path("data/balanced")
NETWORK = Path("models/network.pt")  # the trained network (train)
MODEL = Path("models/model.pt")  # the model package: network + preprocessing + frozen decision (evaluate)
FOLD_MODELS = Path("models/folds")  # cv.folds: models/folds/<n>/network.pt, one per fold (fold@<n>)
CHECKPOINT = Path("models/checkpoints/last.pt")  # persisted between runs: not a DVC output

REPORTS = Path("reports")
DATA_SUMMARY = REPORTS / "data" / "summary.json"
BALANCE_REPORT = REPORTS / "balance.json"

TRAIN_DIR = REPORTS / "train"
FOLD_REPORTS = REPORTS / "folds"  # cv.folds: reports/folds/<n>/, the train stage's files for each fold
HISTORY = "history.csv"
CURVES = "curves.png"

EVAL_DIR = REPORTS / "eval"
PREDICTIONS = "predictions.csv"
VAL_PREDICTIONS = "val_predictions.csv"  # what the temperature and the threshold were fitted on
DECISION_CURVE_CSV, DECISION_CURVE_PNG = "decision_curve.csv", "decision_curve.png"
FAILURES = "failures.json"
DISAGREEMENTS = "fold_disagreements"  # failures.json's kind (cv.folds): test images the fold models disagree on most
ROC_CSV, PR_CSV, CALIBRATION_CSV = "roc.csv", "pr.csv", "calibration.csv"
ROBUSTNESS_PNG = "robustness.png"
EXTERNAL = "external"  # under EVAL_DIR: each site's predictions, sites.csv and the forest plot
SITES_CSV = "sites.csv"
FOREST_PNG = "forest.png"
ROC_PNG, PR_PNG, CONFUSION_PNG, CALIBRATION_PNG, FAILURES_PNG = (
    "roc.png", "pr.png", "confusion.png", "calibration.png", "failures.png")

EXPLAIN_DIR = REPORTS / "explain"
SAMPLES = "samples.json"
ATTRIBUTIONS = "attributions.npy"
FIGURES = "figures"
FAITHFULNESS_PNG, FEATURE_MAPS_PNG, CLASS_IMAGES_PNG = "curves.png", "feature_maps.png", "class_images.png"

REPORT_HTML = REPORTS / "report.html"
MODEL_CARD = REPORTS / "model_card.md"
MLFLOW_RUN = REPORTS / "mlflow_run.json"
