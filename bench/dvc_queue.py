"""Parallel experiment queues lose no run: `dvc exp run --queue` ×4, then `dvc queue start -j N`.

For N = 1 and 2, several repetitions each, in a fresh git + DVC copy of the project with tiny
params (a small phantom, 2 epochs): the wall time from `dvc queue start` until the queue is
empty, how many experiments DVC reports as succeeded, and how many FINISHED MLflow runs carry
their names (exactly one each: nothing lost, nothing twice). The store is the copy's own SQLite
file unless ``--server URI`` points at a tracking server (`make mlflow-server`).

    python bench/dvc_queue.py                      # -j 1 and -j 2, 3 repetitions each
    python bench/dvc_queue.py --repeats 5 --server http://127.0.0.1:5000
"""

from __future__ import annotations

import sys

# This file's folder comes first on sys.path, and its name would shadow the standard library's
# `queue` (which urllib3 imports): search the folder last instead, for `common`.
sys.path.append(sys.path.pop(0))

import argparse  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from pipeline.core.workspace import copy_project  # noqa: E402
from common import provenance  # noqa: E402

TINY = {"data.phantom.image_size": 32, "data.phantom.n_train": 160, "data.phantom.n_val": 60,
        "data.phantom.n_test": 80, "train.width": 4, "train.epochs": 2, "train.batch_size": 32, "train.threads": 1,
        "evaluate.bootstrap": 200, "explain.per_outcome": 1, "explain.worst": 1, "explain.ig_steps": 4,
        "explain.smoothgrad_samples": 4, "explain.lime_samples": 20, "explain.faithfulness_steps": 6,
        "explain.perturbations": 2, "explain.class_image_steps": 5}
LEARNING_RATES = (0.001, 0.002, 0.003, 0.004)


def dvc(args: list[str], root: Path, env: dict[str, str]) -> str:
    return subprocess.run(["dvc", *args], cwd=root, env=env, check=True, capture_output=True, text=True).stdout


def one_round(jobs: int, uri: str | None) -> tuple[float, int, int]:
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory(prefix="medcnn-queue-") as tmp:
        root = Path(tmp)
        env = copy_project(root, TINY)
        if uri:
            env["MLFLOW_TRACKING_URI"] = uri
        names = [re.search(r"Queued experiment '([^']+)'", dvc(["exp", "run", "--queue", "-S", f"train.lr={lr}"],
                                                                 root, env)).group(1) for lr in LEARNING_RATES]
        start = time.perf_counter()
        # The workers outlive `dvc queue start` and inherit its stdout: never a pipe we read.
        subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], cwd=root, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while re.search(r"\b(Queued|Running)\b", status := dvc(["queue", "status"], root, env)):
            time.sleep(2)
        dvc(["queue", "stop"], root, env)
        wall = time.perf_counter() - start
        succeeded = sum(bool(re.search(rf"{name}\s+\S+\s+\S+\s+Success", status)) for name in names)
        client = MlflowClient(uri or f"sqlite:///{root}/mlflow.db")
        experiment = client.get_experiment_by_name("medcnn")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        finished = [r for r in runs if r.data.tags.get("dvc.exp_name") in names and r.info.status == "FINISHED"]
        logged = len(finished) if sorted(r.info.run_name for r in finished) == sorted(names) else -len(finished)
        return wall, succeeded, logged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--server", help="tracking server URI (default: the copy's SQLite store)")
    args = parser.parse_args()
    print(provenance())
    rows = []
    for jobs in (1, 2):
        results = []
        for repeat in range(args.repeats):
            results.append(one_round(jobs, args.server))
            print(f"-j {jobs} round {repeat + 1}: {results[-1]}", file=sys.stderr, flush=True)
        walls = [r[0] for r in results]
        lost = sum(len(LEARNING_RATES) - r[2] for r in results)
        rows.append(f"| {args.server and 'server' or 'SQLite'} | {jobs} | {len(results)} | "
                    f"{statistics.median(walls):.0f} ({min(walls):.0f}–{max(walls):.0f}) | "
                    f"{sum(r[1] for r in results)}/{len(LEARNING_RATES) * len(results)} | "
                    f"{sum(max(r[2], 0) for r in results)}/{len(LEARNING_RATES) * len(results)} | {lost} |")
    print("| store | -j | rounds | wall s, median (range) | experiments succeeded | FINISHED runs, one per experiment | runs lost |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
