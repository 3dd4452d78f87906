"""How fast the trained model answers: pipeline.predict on files, the package alone, the served endpoint.

For the default phantom model and a 28 px PneumoniaMNIST model (each trained here with the
default params, prepare → evaluate, in a temporary folder), it measures:

- end to end: ``pipeline.predict.run`` on the test split exported as PNG files (listing,
  decoding, preprocessing, scoring, the out-of-distribution check, writing the CSV), images/s;
- model only: ``ModelPackage.score`` on the same images already in memory, images/s;
- served: ``mlflow models serve`` on the package, median and p95 latency of one request of 1
  image and of 32 images (JSON over HTTP on localhost).

    python bench/predict_speed.py                    # both models
    python bench/predict_speed.py phantom            # one
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image
from common import provenance

from pipeline import balance, evaluate, predict, prepare, train
from pipeline.core.config import load_params, write_params
from pipeline.core.dataset import load_split
from pipeline.modeling.package import load_package
from pipeline.reporting.mlflow_adapter import ModelSpec, save_model

REPO = Path(__file__).resolve().parents[1]
DATASETS = {
    "phantom": {},
    "pneumoniamnist (28 px)": {"data.source": "npz",
                               "data.path": str(REPO.parent / "shared/data/medmnist/pneumoniamnist.npz")},
}
REPEATS = {1: 60, 32: 30}  # requests per batch size


def rate(work, n: int, repeats: int = 3) -> float:
    best = min(_timed(work) for _ in range(repeats))
    return n / best


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def serve_latency(model_dir: Path, images: np.ndarray) -> dict[int, tuple[float, float]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(["mlflow", "models", "serve", "-m", str(model_dir), "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(240):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            time.sleep(0.5)
        found = {}
        for size, repeats in REPEATS.items():
            body = json.dumps({"inputs": images[:size].tolist()}).encode()
            times = []
            for _ in range(repeats + 3):  # the first requests warm the worker up
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                                 headers={"Content-Type": "application/json"})
                times.append(_timed(lambda: urllib.request.urlopen(request, timeout=60).read()) * 1000)
            times = times[3:]
            found[size] = (statistics.median(times), float(np.quantile(times, 0.95)))
        return found
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def measure(name: str, overrides: dict, tmp: Path) -> list[str]:
    params = load_params(write_params(tmp / "params.yaml", {**overrides, "evaluate.baselines": []},
                                      REPO / "params.yaml"))
    with contextlib.chdir(tmp):
        for stage in (prepare, balance, train, evaluate):
            stage.run(params)
    images = np.asarray(load_split(tmp / "data/prepared", "test")["images"])
    folder = tmp / "pngs"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(folder / f"{i:05d}.png")
    package = load_package(tmp / "models/model.pt")
    end_to_end = rate(lambda: predict.run(folder, tmp / "out.csv", tmp / "models/model.pt"), len(images))
    model_only = rate(lambda: package.score(images), len(images))
    spec = ModelSpec(tmp / "models/model.pt", package.input_shape, package.class_names)
    latency = serve_latency(save_model(spec, tmp / "served"), images)
    size = "×".join(map(str, package.input_shape))
    return [f"| {name} | {size} | {len(images)} | {end_to_end:.0f} | {model_only:.0f} | {end_to_end / model_only:.2f} | "
            f"{latency[1][0]:.1f} / {latency[1][1]:.1f} | {latency[32][0]:.1f} / {latency[32][1]:.1f} |"]


def main() -> None:
    print(provenance())
    logging.basicConfig(level=logging.WARNING)
    chosen = [d for d in DATASETS if not sys.argv[1:] or any(d.startswith(a) for a in sys.argv[1:])]
    rows = []
    for name in chosen:
        with tempfile.TemporaryDirectory(prefix="medcnn-predict-bench-") as tmp:
            rows += measure(name, DATASETS[name], Path(tmp))
        print(f"{name}: done", file=sys.stderr, flush=True)
    print("| model | input | images | end to end (img/s) | model only (img/s) | ratio | served, 1 image: median / p95 ms "
          "| served, 32 images: median / p95 ms |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
