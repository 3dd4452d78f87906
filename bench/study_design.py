"""Study designs, measured: external validation on the phantom's shifted site, and paired comparisons.

Runs prepare → balance → train → evaluate in temporary folders with the project's default
params and prints two Markdown tables:

1. the default phantom model on its internal test split and on the built-in external site
   (``-S 'evaluate.external=[{name: site_c, source: phantom, recalibrate: 0.3}]'``): ROC AUC with
   its CI, calibration-in-the-large and slope, the share flagged out of distribution, the share
   of decisions a mild corruption leaves, and the heterogeneity across both;
2. on BreastMNIST (``../shared/data/medmnist/``), each pair of seeds compared on the same test
   images with ``python -m pipeline.compare``'s tests (DeLong for ROC AUC, McNemar for the
   decisions): do three seeds of one recipe differ, or only look different side by side?
3. on BreastMNIST, the single split against 5-fold cross-validation (``cv.folds: [1, 2, 3, 4, 5]``)
   side by side for each seed: test ROC AUC of the single model and of the fold ensemble, the
   cross-validated estimate, and the wall time of prepare → report of each (every stage DVC
   runs but MLflow logging), with their ratio.

    python bench/study_design.py             # all three
    python bench/study_design.py external    # the phantom's site only
    python bench/study_design.py compare 0 1 2
    python bench/study_design.py cv 0 1 2
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import provenance

from pipeline import balance, compare, evaluate, explain, fold, prepare, report, train
from pipeline.core.config import load_params, write_params
from pipeline.core.files import fmt
from pipeline.reporting.external import with_ci

REPO = Path(__file__).resolve().parents[1]
BREAST = REPO.parent / "shared" / "data" / "medmnist" / "breastmnist.npz"
SITE = {"name": "site_c", "source": "phantom", "recalibrate": 0.3}


def run_to_evaluate(root: Path, overrides: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """evaluate's metrics and the wall seconds of prepare → evaluate, run in ``root``."""
    with contextlib.chdir(root):
        params = load_params(write_params(root / "params.yaml", overrides, REPO / "params.yaml"))
        start = time.perf_counter()
        for stage in (prepare, balance, train):
            stage.run(params)
        return evaluate.run(params), time.perf_counter() - start


def external_table() -> None:
    with tempfile.TemporaryDirectory(prefix="medcnn-bench-external-") as tmp:
        found, seconds = run_to_evaluate(Path(tmp), {"evaluate.external": [SITE]})
    internal, site = found["test"], found["external"]["sites"]["site_c"]
    spread = found["external"]["heterogeneity"]["roc_auc"]
    after = found["calibration"]["after"]
    print(f"\nExternal validation, default phantom model ({seconds:.0f} s prepare → evaluate):\n")
    print("| | images | ROC AUC (95% CI) | sensitivity | specificity | calibration-in-the-large | calibration slope "
          "| flagged OOD | decisions kept, mild corruption |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| internal test | {internal['n']} | {with_ci(internal, 'roc_auc')} | {fmt(internal['sensitivity'])} | "
          f"{fmt(internal['specificity'])} | – | {with_ci(after, 'slope')} | "
          f"{fmt(found['out_of_distribution']['test_flagged'] / internal['n'])} | – |")
    print(f"| site_c | {site['n']} | {with_ci(site['test'], 'roc_auc')} | {fmt(site['test']['sensitivity'])} | "
          f"{fmt(site['test']['specificity'])} | {with_ci(site['calibration'], 'citl')} | "
          f"{with_ci(site['calibration'], 'slope')} | {fmt(site['out_of_distribution'])} | "
          f"{fmt(site['decision_stability']['mean'])} |")
    recal = site["recalibrated"]
    print(f"\nHeterogeneity: Cochran's Q {fmt(spread['q'])} (df {spread['df']}, p {fmt(spread['p_value'])}), "
          f"I² {fmt(spread['i2'])}. Recalibrated on {recal['fitted_on']} of site_c's images, on the other "
          f"{recal['scored_on']}: accuracy {fmt(recal['untouched']['accuracy'])} → "
          f"{fmt(recal['recalibrated']['accuracy'])}, sensitivity {fmt(recal['untouched']['sensitivity'])} → "
          f"{fmt(recal['recalibrated']['sensitivity'])}, specificity {fmt(recal['untouched']['specificity'])} → "
          f"{fmt(recal['recalibrated']['specificity'])}.")


def compare_table(seeds: list[int]) -> None:
    with tempfile.TemporaryDirectory(prefix="medcnn-bench-compare-") as tmp:
        roots, seconds = {}, []
        for seed in seeds:
            roots[seed] = Path(tmp) / f"seed{seed}"
            roots[seed].mkdir()
            _, spent = run_to_evaluate(roots[seed], {"seed": seed, "data.source": "npz", "data.path": str(BREAST)})
            seconds.append(spent)
            print(f"breastmnist seed {seed}: {spent:.0f} s", file=sys.stderr, flush=True)
        print(f"\nBreastMNIST, default params, seeds compared on the same test images "
              f"({sum(seconds) / len(seconds):.0f} s per run):\n")
        print("| A | B | ROC AUC A | ROC AUC B | B − A (95% CI) | DeLong p | only A right | only B right | McNemar p "
              "| compare s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for a, b in itertools.combinations(seeds, 2):
            start = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # its sentences; the table stays on stdout
                result = compare.run(str(roots[a]), str(roots[b]), Path(tmp) / f"{a}_vs_{b}", log=False)
            spent = time.perf_counter() - start
            test, mc = result["delong"], result["mcnemar"]
            print(f"| seed {a} | seed {b} | {fmt(test['auc_a'])} | {fmt(test['auc_b'])} | {fmt(test['difference'])} "
                  f"({fmt(test['ci_low'])} to {fmt(test['ci_high'])}) | {fmt(test['p_value'])} | {mc['a_only']} | "
                  f"{mc['b_only']} | {fmt(mc['p_value'])} | {spent:.2f} |")


def run_to_report(root: Path, overrides: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """evaluate's metrics and the wall seconds of every stage ``dvc repro`` runs before MLflow
    logging: prepare, balance, the fold stages and the ensemble (or train), evaluate, explain, report."""
    with contextlib.chdir(root):
        params = load_params(write_params(root / "params.yaml", overrides, REPO / "params.yaml"))
        start = time.perf_counter()
        prepare.run(params)
        balance.run(params)
        for number in params.cv.folds:
            fold.run(params, number)
        train.assemble(params) if params.cv.k else train.run(params)
        found = evaluate.run(params)
        explain.run(params)
        report.run(params)
        return found, time.perf_counter() - start


def cv_table(seeds: list[int]) -> None:
    breast = {"data.source": "npz", "data.path": str(BREAST)}
    ratios = []
    print("\nBreastMNIST, default params: the single split against 5-fold cross-validation (fold ensemble), "
          "prepare → report wall seconds on this machine:\n")
    print("| seed | single split: test ROC AUC | 5-fold ensemble: test ROC AUC | ensemble − single (95% CI), "
          "DeLong p | out-of-fold ROC AUC (pooled) | per fold, mean ± sd | ensemble disagreement (mean sd) "
          "| single s | 5-fold s | time ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory(prefix="medcnn-bench-cv-") as tmp:
        for seed in seeds:
            found = {}
            for design, extra in (("single", {}), ("5-fold", {"cv.folds": [1, 2, 3, 4, 5]})):
                root = Path(tmp) / f"{design}-{seed}"
                root.mkdir()
                found[design] = run_to_report(root, {**breast, "seed": seed, **extra})
                print(f"breastmnist seed {seed} {design}: {found[design][1]:.0f} s", file=sys.stderr, flush=True)
            (single, single_s), (cv, cv_s) = found["single"], found["5-fold"]
            estimate = cv["cross_validation"]
            ratios.append(cv_s / single_s)
            with contextlib.redirect_stdout(sys.stderr):  # the same test images, paired
                paired = compare.run(str(Path(tmp) / f"single-{seed}"), str(Path(tmp) / f"5-fold-{seed}"),
                                     Path(tmp) / f"compare-{seed}", log=False)["delong"]
            print(f"| {seed} | {with_ci(single['test'], 'roc_auc')} | {with_ci(cv['test'], 'roc_auc')} | "
                  f"{fmt(paired['difference'])} ({fmt(paired['ci_low'])} to {fmt(paired['ci_high'])}), "
                  f"{fmt(paired['p_value'])} | "
                  f"{with_ci(estimate['pooled'], 'roc_auc')} | {fmt(estimate['mean']['roc_auc'])} ± "
                  f"{fmt(estimate['sd']['roc_auc'])} | {fmt(estimate['disagreement']['mean_sd'])} | "
                  f"{single_s:.0f} | {cv_s:.0f} | {cv_s / single_s:.2f} |", flush=True)
    print(f"\nMean time ratio {sum(ratios) / len(ratios):.2f}.")


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    args = sys.argv[1:]
    print(provenance())
    if not args or args[0] == "external":
        external_table()
    if not args or args[0] == "compare":
        compare_table([int(a) for a in args[1:]] or [0, 1, 2])
    if not args or args[0] == "cv":
        cv_table([int(a) for a in args[1:]] or [0, 1, 2])


if __name__ == "__main__":
    main()
