"""Multi-label findings and ordinal grades on the phantom: per-finding AUC and localisation,
and the ordinal losses side by side (CORN against cross-entropy, chosen on validation kappa).

Runs prepare → balance → train → evaluate → explain (Saliency and Integrated Gradients) with
the default params and ``data.phantom.task`` set, in a temporary folder, and prints two tables.

    python bench/tasks.py                # both tasks
    python bench/tasks.py multilabel     # one
    python bench/tasks.py seeds          # the ordinal phantom with CORN over seeds 0-2: kappa's spread
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from common import provenance

from pipeline import balance, evaluate, explain, prepare, train
from pipeline.core.config import load_params, write_params

REPO = Path(__file__).resolve().parents[1]
EXPLAIN = {"explain.methods": ["saliency", "integrated_gradients"], "explain.class_image_steps": 0}
RUNS = {
    "multilabel": [("multilabel", {"data.phantom.task": "multilabel"})],
    "ordinal": [("ordinal, CORN (train.loss auto)", {"data.phantom.task": "ordinal", "train.loss": "corn"}),
                ("ordinal, cross-entropy", {"data.phantom.task": "ordinal", "train.loss": "cross_entropy"})],
    "seeds": [(f"ordinal, CORN, seed {seed}", {"data.phantom.task": "ordinal", "seed": seed}) for seed in (0, 1, 2)],
}


def run(folder: Path, overrides: dict) -> tuple[dict, dict, dict, float]:
    params = load_params(write_params(folder / "params.yaml", {**EXPLAIN, **overrides}, REPO / "params.yaml"))
    start = time.perf_counter()
    prepare.run(params)
    balance.run(params)
    trained = train.run(params)["train"]
    evaluated = evaluate.run(params)
    seconds = time.perf_counter() - start
    return trained, evaluated, explain.run(params), seconds


def ci(metrics: dict, key: str) -> str:
    return f"{metrics[key]:.4f} ({metrics[f'{key}_ci_low']:.3f}–{metrics[f'{key}_ci_high']:.3f})"


def main() -> None:
    print(provenance())
    logging.basicConfig(level=logging.WARNING)
    chosen = sys.argv[1:] or list(RUNS)
    tables: dict[str, list[str]] = {}
    for task in chosen:
        for name, overrides in RUNS[task]:
            with tempfile.TemporaryDirectory(prefix="medcnn-tasks-") as tmp, contextlib.chdir(tmp):
                trained, evaluated, explained, seconds = run(Path(tmp), overrides)
            test = evaluated["test"]
            if task == "multilabel":
                for finding, found in test["findings"].items():
                    pointing = [explained["explain"][m]["localisation_by_finding"][finding]["pointing_game"]
                                for m in ("saliency", "integrated_gradients")]
                    tables.setdefault(task, []).append(
                        f"| {finding} | {ci(found, 'roc_auc')} | {found['average_precision']:.4f} "
                        f"| {found['sensitivity']:.4f} | {found['specificity']:.4f} "
                        f"| {pointing[0]:.3f} | {pointing[1]:.3f} |")
                tables[task].append(f"| all (macro; {seconds:.0f} s to train and evaluate) | {ci(test, 'roc_auc')} "
                                    f"| micro AUC {test['roc_auc_micro']:.4f} | MedMNIST ACC {test['accuracy']:.4f} "
                                    f"| exact match {test['exact_match']:.4f} | | |")
            elif task == "seeds":
                tables.setdefault(task, []).append(test["kappa"])
                tables.setdefault("ordinal", []).append(
                    f"| {name} | {trained['val_kappa']:.4f} | {ci(test, 'kappa')} | {test['mae']:.4f} "
                    f"| {test['accuracy']:.4f} | {test['within_one']:.4f} | {test['roc_auc']:.4f} | {seconds:.0f} |")
            else:
                tables.setdefault(task, []).append(
                    f"| {name} | {trained['val_kappa']:.4f} | {ci(test, 'kappa')} | {test['mae']:.4f} "
                    f"| {test['accuracy']:.4f} | {test['within_one']:.4f} | {test['roc_auc']:.4f} | {seconds:.0f} |")
            print(f"{name}: done in {seconds:.0f} s", file=sys.stderr, flush=True)
    if "multilabel" in tables:
        print("\n| finding | test ROC AUC (95% CI) | AP | sensitivity | specificity | pointing game, Saliency "
              "| pointing game, IG |\n|---|---|---|---|---|---|---|")
        print("\n".join(tables["multilabel"]))
    if "ordinal" in tables:
        print("\n| ordinal phantom | val kappa | test kappa (95% CI) | MAE | accuracy | within one grade | macro AUC "
              "| train+evaluate s |\n|---|---|---|---|---|---|---|---|")
        print("\n".join(tables["ordinal"]))
    if "seeds" in tables:
        kappas = tables["seeds"]
        print(f"\ntest kappa over seeds {', '.join(str(o['seed']) for _, o in RUNS['seeds'])}: "
              f"{sum(kappas) / len(kappas):.4f} ± {statistics.stdev(kappas):.4f} (mean ± sd)")


if __name__ == "__main__":
    main()
