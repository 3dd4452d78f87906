"""Tuned presets, found on validation and measured on test: ``presets/<dataset>.yaml``.

``tune DATASET`` runs ``python -m pipeline.tune``'s study on a MedMNIST dataset
(``../shared/data/medmnist/``) with this file's search space for it (the test split is not
read) and writes the study's output as the preset, with ``setting``: the params that select
the dataset and the design the study ran under, which ``python -m pipeline.tune args`` prints
before the tuned ones. ``measure DATASET --seeds …`` then runs prepare → evaluate with the default
params and with the preset for each seed and prints test ROC AUC and accuracy side by side.

    python bench/presets.py tune breastmnist
    # finish a stopped study, at 10 trials in all:
    python bench/presets.py tune breastmnist --trials 10 --storage optuna.db --name tune-7510998d4a
    python bench/presets.py measure breastmnist --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from common import provenance
from study_design import run_to_report

from pipeline import prepare, tune
from pipeline.core.config import load_params, write_params
from pipeline.core.files import fmt, write_text

REPO = Path(__file__).resolve().parents[1]
MEDMNIST = REPO.parent / "shared" / "data" / "medmnist"
PRESETS = REPO / "presets"

# The searched keys (tune.space) and the fixed design of each dataset's study. BreastMNIST's
# validation split holds 78 images: its study scores each trial on 5 folds of train + val, and
# the preset is the fold ensemble. PneumoniaMNIST's validation AUC sits near 0.998 for most
# recipes, so its study also searches the width and the learning-rate schedule.
COMMON = [
    {"key": "train.lr", "low": 0.0003, "high": 0.01, "log": True},
    {"key": "train.weight_decay", "low": 0.00001, "high": 0.001, "log": True},
    {"key": "train.warmup_epochs", "low": 0, "high": 3},
    {"key": "train.aug_rotate", "low": 0.0, "high": 15.0},
    {"key": "train.aug_scale", "low": 0.0, "high": 0.15},
    {"key": "train.aug_translate", "low": 0.0, "high": 0.1},
    {"key": "train.width", "choices": [12, 16, 24]},
    {"key": "train.label_smoothing", "low": 0.0, "high": 0.1},
]
STUDIES: dict[str, dict[str, Any]] = {
    "breastmnist": {"setting": {"data.source": "medmnist", "data.name": "breastmnist", "cv.folds": [1, 2, 3, 4, 5]},
                    "space": [*COMMON, {"key": "balance.strategy", "choices": ["class_weight", "oversample"]}],
                    "trials": 24},
    "pneumoniamnist": {"setting": {"data.source": "medmnist", "data.name": "pneumoniamnist"},
                       "space": [*COMMON, {"key": "train.schedule", "choices": ["cosine", "onecycle"]}],
                       "trials": 24},
}


def local(setting: dict[str, Any]) -> dict[str, Any]:
    """The setting with MedMNIST read from the shared copy (no download on this machine)."""
    return {**setting, "data.raw_dir": str(MEDMNIST)}


def tune_preset(dataset: str, trials: int | None = None, storage: str | None = None, name: str | None = None) -> None:
    """The study (``trials`` instead of the dataset's count; an existing ``storage`` and study
    ``name`` to finish a study stopped early: its trials are kept, the rest run) into the preset."""
    study = STUDIES[dataset]
    with tempfile.TemporaryDirectory(prefix="medcnn-bench-preset-") as tmp, contextlib.chdir(tmp):
        params = load_params(write_params(Path(tmp) / "params.yaml", {
            **local(study["setting"]), "tune.trials": trials or study["trials"], "tune.space": study["space"]},
            REPO / "params.yaml"))
        prepare.run(params)
        start = time.perf_counter()
        summary = tune.run(params, storage=storage or str(Path(tmp) / "optuna.db"), name=name, log_mlflow=False,
                           out=Path(tmp) / "best.yaml")
        spent = time.perf_counter() - start
    preset = {"dataset": dataset, "setting": study["setting"], **summary}
    write_text(PRESETS / f"{dataset}.yaml", yaml.safe_dump(preset, sort_keys=False, allow_unicode=True))
    print(f"{dataset}: {summary['trials']} trials ({summary['complete']} complete, {summary['pruned']} pruned) in "
          f"{spent:.0f} s, best validation {fmt(summary['best_value'])}: {summary['params']}")


def measure(dataset: str, seeds: list[int]) -> None:
    preset_file = PRESETS / f"{dataset}.yaml"
    preset = yaml.safe_load(preset_file.read_text())
    designs = {"default": local({k: v for k, v in preset["setting"].items() if k.startswith("data.")}),
               "preset": local({**preset["setting"], **preset["params"], "tune.result": str(preset_file)})}
    print(f"\n{dataset}: the default params against presets/{dataset}.yaml (tuned on validation only), test split:\n")
    print("| seed | default ROC AUC | default accuracy | preset ROC AUC | preset accuracy | default s | preset s |")
    print("|---|---|---|---|---|---|---|", flush=True)
    means: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="medcnn-bench-presets-") as tmp:
        for seed in seeds:
            row = {}
            for design, overrides in designs.items():
                root = Path(tmp) / f"{design}-{seed}"
                root.mkdir()
                found, seconds = run_to_report(root, {**overrides, "seed": seed})
                row[design] = (found["test"]["roc_auc"], found["test"]["accuracy"], seconds)
                means.setdefault(f"{design} auc", []).append(row[design][0])
                means.setdefault(f"{design} acc", []).append(row[design][1])
            (da, dc, ds), (pa, pc, ps) = row["default"], row["preset"]
            print(f"| {seed} | {fmt(da)} | {fmt(dc)} | {fmt(pa)} | {fmt(pc)} | {ds:.0f} | {ps:.0f} |", flush=True)
    mean = {k: sum(v) / len(v) for k, v in means.items()}
    print(f"| mean | {fmt(mean['default auc'])} | {fmt(mean['default acc'])} | {fmt(mean['preset auc'])} | "
          f"{fmt(mean['preset acc'])} | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["tune", "measure"])
    parser.add_argument("dataset", choices=sorted(STUDIES))
    parser.add_argument("--trials", type=int, help="tune: trials instead of the dataset's count")
    parser.add_argument("--storage", help="tune: an existing Optuna storage, to finish a study stopped early")
    parser.add_argument("--name", help="tune: the study's name in --storage")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="measure: the seeds (default 0 1 2)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(provenance())
    if args.command == "tune":
        tune_preset(args.dataset, args.trials, args.storage, args.name)
    else:
        measure(args.dataset, args.seeds)


if __name__ == "__main__":
    main()
