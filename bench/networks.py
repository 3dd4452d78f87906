"""The networks side by side: test ROC AUC, training speed and the peak memory of train and explain.

For each ``train.model`` and each dataset (PneumoniaMNIST from ``../shared/data/medmnist/`` and
the phantom at 32 px), runs prepare → balance → train → evaluate → explain in a temporary folder,
each stage a subprocess that records its own peak RSS (VmHWM), and prints one Markdown row per
network and seed: test ROC AUC and accuracy, train images/s (the train stage's own timing),
the epochs run, and the peak RSS of train and explain (Grad-CAM, Integrated Gradients and
occlusion). ResNets train at width 64 (the published
width); the small CNN at its default.

``memory`` instead trains DenseNet-121 for one epoch on the phantom at 128 px and explains it
with every method, and prints explain's peak RSS as a multiple of train's.

    python bench/networks.py                              # every network, both datasets, seed 0, 3 epochs
    python bench/networks.py --models densenet121 small_cnn --seeds 0 1 2 --epochs 15
    python bench/networks.py memory
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import REPO, provenance, run_stage

from pipeline.core.config import write_params
from pipeline.core.files import fmt

MEDMNIST = REPO.parent / "shared" / "data" / "medmnist"
MODELS = ["small_cnn", "resnet18", "monai_resnet18", "resnet50", "densenet121", "efficientnet_b0", "seresnext50"]
DATASETS = {"phantom": {"data.phantom.image_size": 32},  # 32 px: the big networks at 64 px take hours here
            "pneumoniamnist": {"data.source": "npz", "data.path": str(MEDMNIST / "pneumoniamnist.npz")}}
STAGES = ("prepare", "balance", "train", "evaluate", "explain")
# The table's explain: Grad-CAM, Integrated Gradients and occlusion on 20 localisation images
# (every method on the big networks takes hours on 2 cores; ``memory`` runs them all).
EXPLAIN = {"explain.methods": ["grad_cam", "integrated_gradients", "occlusion"], "explain.localisation_images": 20}


def run(work: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Every stage in ``work``: test metrics, the train stage's timing and each stage's peak RSS (MB)."""
    work.mkdir(parents=True)
    write_params(work / "params.yaml", overrides, REPO / "params.yaml")
    peaks = {}
    for stage in STAGES:
        result = run_stage(work, stage)
        if result is None:
            raise SystemExit(f"{stage} was killed for memory in {work}")
        peaks[stage] = result[1]
    test = json.loads((work / "reports/eval/metrics.json").read_text())["test"]
    timing = json.loads((work / "reports/train/timing.json").read_text())
    train = json.loads((work / "reports/train/metrics.json").read_text())["train"]
    return {"auc": test["roc_auc"], "accuracy": test["accuracy"], "images_per_second": timing["images_per_second"],
            "epochs": train["epochs_run"], "parameters": train["parameters"], "train_mb": peaks["train"],
            "explain_mb": peaks["explain"]}


def table(models: list[str], datasets: list[str], seeds: list[int], epochs: int) -> None:
    print(f"\nAt most {epochs} epochs (early stopping with the default patience), default recipe otherwise:\n")
    print("| dataset | network | parameters | seed | test ROC AUC | test accuracy | train images/s | epochs run "
          "| train peak RSS MB | explain peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory(prefix="medcnn-bench-networks-") as tmp:
        for dataset in datasets:
            for model in models:
                for seed in seeds:
                    found = run(Path(tmp) / f"{dataset}-{model}-{seed}", {
                        **DATASETS[dataset], **EXPLAIN, "seed": seed, "train.model": model, "train.epochs": epochs,
                        **({"train.width": 64} if "resnet" in model else {})})
                    print(f"| {dataset} | {model} | {found['parameters']:,} | {seed} | {fmt(found['auc'])} | "
                          f"{fmt(found['accuracy'])} | {found['images_per_second']:.0f} | {found['epochs']} | "
                          f"{found['train_mb']:.0f} | {found['explain_mb']:.0f} |", flush=True)


def memory() -> None:
    with tempfile.TemporaryDirectory(prefix="medcnn-bench-networks-") as tmp:
        found = run(Path(tmp) / "densenet-128", {"data.phantom.image_size": 128, "train.model": "densenet121",
                                                   "train.epochs": 1, "explain.localisation_images": 10})
    print("\nDenseNet-121 on the phantom at 128 px, one epoch, every explain method (10 localisation images):\n")
    print("| train peak RSS MB | explain peak RSS MB | explain / train | test ROC AUC |")
    print("|---|---|---|---|")
    print(f"| {found['train_mb']:.0f} | {found['explain_mb']:.0f} | {found['explain_mb'] / found['train_mb']:.2f} | "
          f"{fmt(found['auc'])} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="table", choices=["table", "memory"])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    print(provenance())
    if args.what == "memory":
        memory()
    else:
        table(args.models, args.datasets, args.seeds, args.epochs)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
