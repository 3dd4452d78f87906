"""Shared fixtures: tiny params (small phantom, 2 epochs), a tiny pipeline run, temp stores.

Tests never touch the repository's own data/, models/, reports/ or mlflow.db: every run
happens in a temporary folder.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.params import Params, load_params
from pipeline.params import write_params as params_file

REPO = Path(__file__).resolve().parents[1]
MEDMNIST = REPO.parent / "shared" / "data" / "medmnist"

TINY: dict[str, Any] = {
    "data.phantom.image_size": 32,
    "data.phantom.n_train": 160,
    "data.phantom.n_val": 60,
    "data.phantom.n_test": 80,
    "train.width": 4,
    "train.epochs": 2,
    "train.batch_size": 32,
    "train.threads": 1,
    "evaluate.bootstrap": 200,
    "explain.per_class": 1,
    "explain.worst": 1,
    "explain.ig_steps": 4,
    "explain.smoothgrad_samples": 4,
    "explain.lime_samples": 20,
    "explain.faithfulness_steps": 6,
    "explain.perturbations": 2,
    "explain.class_image_steps": 5,
}


def write_params(path: Path, overrides: dict[str, Any] | None = None) -> Path:
    """The repository's params.yaml with dotted-key overrides, written to ``path``."""
    return params_file(path, overrides or {}, REPO / "params.yaml")


def tiny_params(folder: Path, **overrides: Any) -> Params:
    return load_params(write_params(folder / "params.yaml", {**TINY, **overrides}))


@pytest.fixture
def params(tmp_path: Path) -> Params:
    return tiny_params(tmp_path)


def run_stages(root: Path, params: Params, stages: tuple[str, ...]) -> None:
    """Run stage ``run`` functions in ``root`` (their default paths are relative)."""
    import importlib

    with contextlib.chdir(root):
        for stage in stages:
            importlib.import_module(f"pipeline.{stage}").run(params)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Params]:
    """prepare → balance → train → evaluate → explain → report on the tiny phantom, once per session."""
    root = tmp_path_factory.mktemp("tiny_run")
    params = tiny_params(root)
    run_stages(root, params, ("prepare", "balance", "train", "evaluate", "explain", "report"))
    return root, params


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The default store rooted at a temp folder (as DVC_ROOT would set it)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    yield tmp_path
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # mlflow.set_tracking_uri exports it


def make_npz(path: Path, n: tuple[int, int, int] = (40, 12, 16), classes: int = 2, size: int = 8,
             channels: int | None = None, seed: int = 0, **replace: np.ndarray) -> Path:
    """A small MedMNIST-format file; ``replace`` swaps in arrays to make it bad."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        shape = (count, size, size) if channels is None else (count, size, size, channels)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % classes).astype(np.uint8).reshape(-1, 1)
    arrays.update(replace)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path
