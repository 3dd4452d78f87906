"""Explanation speed: maps per second per method, IG batching, and the whole explain stage.

Uses the workspace's trained model and prepared data (run `make run` first). Prints one row
per method (maps/s on a batch of test images), Integrated Gradients with and without
Captum's internal batching, and the wall time of the default explain stage (written to a
temporary folder; the workspace's reports are left alone).

    python bench/explain_speed.py [n_images]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import provenance

from pipeline import explain
from pipeline.core.config import load_params
from pipeline.core.dataset import load_split
from pipeline.core.runtime import configure_torch
from pipeline.modeling.networks import images_to_tensor
from pipeline.modeling.package import load_package
from pipeline.xai import attributions

REPO = Path(__file__).resolve().parents[1]


def rate(fn, n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def main() -> None:
    print(provenance())
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    params = load_params(REPO / "params.yaml")
    configure_torch(params.train.threads)
    model = load_package(REPO / "models/model.pt").network
    test = load_split(REPO / "data/prepared", "test")
    inputs = images_to_tensor(np.asarray(test["images"][:n]))
    with torch.no_grad():
        targets = model(inputs).argmax(1)
    cfg = params.explain
    print("| method | maps per second |\n|---|---|")
    for method in attributions.TITLES:
        speed = rate(lambda: attributions.attribute(model, inputs, targets, cfg, params.seed, (method,)), n)
        print(f"| {method} | {speed:.1f} |")
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(model)
    for label, batch in (("IG, one image at a time", None), ("IG, internal_batch_size=4×steps", 4 * cfg.ig_steps),
                         (f"IG, whole batch ({n}×steps)", n * cfg.ig_steps)):
        def run_ig(batch=batch):
            if batch is None:
                for i in range(n):
                    ig.attribute(inputs[i:i + 1].clone().requires_grad_(True), baselines=0.0, target=targets[i:i + 1],
                                 n_steps=cfg.ig_steps)
            else:
                ig.attribute(inputs.clone().requires_grad_(True), baselines=0.0, target=targets, n_steps=cfg.ig_steps,
                             internal_batch_size=batch)
        print(f"| {label} | {rate(run_ig, n):.1f} |")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        explain.run(params, REPO / "data/prepared", REPO / "models/model.pt", REPO / "reports/eval/failures.json", Path(tmp))
        print(f"\nwhole explain stage (default params, {len(cfg.methods)} methods + trust measurements): "
              f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
