"""Quality against the published MedMNIST v2 baselines (Scientific Data 2023, test set, 28×28).

Trains with the project's default training params on PneumoniaMNIST and BreastMNIST from
``../shared/data/medmnist/``, one run per seed, and prints the paper's table with this
project's row added (mean ± sd over seeds, wall time per run). Accuracy is taken at the
operating threshold chosen on validation (``evaluate.threshold``); the test split is never
used for any choice.

    python bench/quality.py                 # both datasets, seeds 0 1 2
    python bench/quality.py breastmnist 0   # one dataset, one seed
    python bench/quality.py -S train.epochs=40 breastmnist   # try other params, as ``dvc exp run -S``
    python bench/quality.py phantom5rgb     # multi-class and RGB: 5 classes, 3 channels, 64 px

``phantom5rgb`` is made by the bench from the phantom (nothing downloaded or committed): 80%
of the scans carry a lesion, and the class is "normal" or the quadrant of the lesion's centre
(4 classes, from its saved mask); the three channels are the scan at gamma 1, 0.8 and 1.25.
It has no published row; it shows that nothing is tuned only for binary grey images. Its AUC
is the macro one-vs-rest ROC AUC.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import provenance

from pipeline import balance, evaluate, prepare, train
from pipeline.core.config import load_params, parse_overrides, write_params

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "medmnist"
PUBLISHED = {  # (AUC, ACC) on the test split, MedMNIST v2 Table
    "ResNet-18 (28)": {"pneumoniamnist": (0.944, 0.854), "breastmnist": (0.901, 0.863)},
    "ResNet-50 (28)": {"pneumoniamnist": (0.948, 0.854), "breastmnist": (0.857, 0.812)},
    "auto-sklearn": {"pneumoniamnist": (0.942, 0.855), "breastmnist": (0.836, 0.803)},
    "AutoKeras": {"pneumoniamnist": (0.947, 0.878), "breastmnist": (0.871, 0.831)},
    "Google AutoML Vision": {"pneumoniamnist": (0.991, 0.946), "breastmnist": (0.919, 0.861)},
}
PUBLISHED_SETS = set(PUBLISHED["ResNet-18 (28)"])  # the datasets the paper's table has
QUADRANTS = ("normal", "upper-left", "upper-right", "lower-left", "lower-right")


def phantom5rgb(path: Path) -> Path:
    """A 5-class RGB MedMNIST-format file made from the phantom (see the module docstring)."""
    from pipeline.core.dataset import SPLITS
    from pipeline.data import phantom

    config = dataclasses.replace(load_params(REPO / "params.yaml").data.phantom, prevalence=0.8,
                                 n_train=2000, n_val=500, n_test=1000)
    arrays = {}
    for split in SPLITS:
        scans = phantom.generate_split(config, 0, split)
        side = scans["masks"].shape[-1]
        labels = np.zeros(len(scans["labels"]), dtype=np.int64)
        for i in np.flatnonzero(scans["labels"]):
            rows, cols = np.nonzero(scans["masks"][i])
            labels[i] = 1 + 2 * int(rows.mean() >= side / 2) + int(cols.mean() >= side / 2)
        grey = scans["images"][..., 0] / 255.0
        arrays[f"{split}_images"] = np.rint(np.stack([grey, grey**0.8, grey**1.25], axis=-1) * 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None]
    np.savez_compressed(path, **arrays)
    return path


def one_run(dataset: str, seed: int, overrides: dict[str, object]) -> tuple[float, float, float]:
    """Test AUC, accuracy and wall seconds (prepare → evaluate) for one seed."""
    with tempfile.TemporaryDirectory(prefix="medcnn-quality-") as tmp, contextlib.chdir(tmp):
        if dataset == "phantom5rgb":
            source = {"data.path": str(phantom5rgb(Path(tmp) / "phantom5rgb.npz")),
                      "data.class_names": list(QUADRANTS)}
        else:
            source = {"data.path": str(DATA / f"{dataset}.npz")}
        params = load_params(write_params(Path("params.yaml"), {
            **overrides, **source, "seed": seed, "data.source": "npz",
            "evaluate.baselines": [], "evaluate.bootstrap": 200}, REPO / "params.yaml"))
        start = time.perf_counter()
        for stage in (prepare, balance, train):
            stage.run(params)
        test = evaluate.run(params)["test"]
        return test["roc_auc"], test["accuracy"], time.perf_counter() - start


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-S", dest="overrides", action="append", default=[], help="params override key=value")
    parser.add_argument("targets", nargs="*", help="dataset names and seeds")
    args = parser.parse_args()
    print(provenance())
    overrides = parse_overrides(args.overrides)
    datasets = [a for a in args.targets if not a.isdigit()] or ["pneumoniamnist", "breastmnist"]
    seeds = [int(a) for a in args.targets if a.isdigit()] or [0, 1, 2]
    ours = {}
    for dataset in datasets:
        runs = []
        for seed in seeds:
            runs.append(one_run(dataset, seed, overrides))
            print(f"{dataset} seed {seed}: AUC {runs[-1][0]:.4f} ACC {runs[-1][1]:.4f} ({runs[-1][2]:.0f} s)",
                  file=sys.stderr, flush=True)
        ours[dataset] = np.array(runs)
    print("| method | " + " | ".join(f"{d} AUC | {d} ACC" for d in datasets) + " |")
    print("|---|" + "---|---|" * len(datasets))
    for name, rows in PUBLISHED.items() if PUBLISHED_SETS.intersection(datasets) else ():
        print(f"| {name} | " + " | ".join(f"{rows[d][0]:.3f} | {rows[d][1]:.3f}" if d in rows else "– | –"
                                         for d in datasets) + " |")
    print(f"| medcnn ({len(seeds)} seeds) | " + " | ".join(
        f"{ours[d][:, 0].mean():.3f} ± {ours[d][:, 0].std(ddof=1) if len(seeds) > 1 else 0:.3f} | "
        f"{ours[d][:, 1].mean():.3f} ± {ours[d][:, 1].std(ddof=1) if len(seeds) > 1 else 0:.3f}" for d in datasets) + " |")
    for d in datasets:
        line = f"{d}: wall per run {ours[d][:, 2].mean():.0f} s (max {ours[d][:, 2].max():.0f} s)"
        if d in PUBLISHED_SETS:
            bar_auc = max(r[d][0] for n, r in PUBLISHED.items() if n != "Google AutoML Vision")
            bar_acc = max(r[d][1] for n, r in PUBLISHED.items() if n != "Google AutoML Vision")
            line += (f"; beats every ResNet, auto-sklearn and AutoKeras row: AUC {ours[d][:, 0].mean() > bar_auc}, "
                     f"ACC {ours[d][:, 1].mean() > bar_acc}")
        print(line)


if __name__ == "__main__":
    main()
