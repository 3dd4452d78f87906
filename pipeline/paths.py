"""Where each stage reads and writes, relative to the repository root (DVC's working dir).

These are the same paths ``dvc.yaml`` declares; stages take them as defaults so tests can
point a stage at a temporary folder instead.
"""

from pathlib import Path

PARAMS = Path("params.yaml")
PREPARED = Path("data/prepared")
BALANCED = Path("data/balanced")
MODEL = Path("models/model.pt")
CHECKPOINT = Path("models/checkpoints/last.pt")  # persisted between runs: not a DVC output
REPORTS = Path("reports")
DATA_SUMMARY = REPORTS / "data" / "summary.json"
BALANCE_REPORT = REPORTS / "balance.json"
TRAIN_DIR = REPORTS / "train"
EVAL_DIR = REPORTS / "eval"
EXPLAIN_DIR = REPORTS / "explain"
REPORT_HTML = REPORTS / "report.html"
MODEL_CARD = REPORTS / "model_card.md"
MLFLOW_RUN = REPORTS / "mlflow_run.json"
DVC_LOCK = Path("dvc.lock")
