"""Shared fixtures: tiny params (small phantom, 2 epochs), tiny pipeline runs, temp stores.

Tests never touch the repository's own data/, models/, reports/ or mlflow.db: every test
runs in its own temporary working directory (so a stage's relative default paths land
there), and the session fails if any of those repository paths changed.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pipeline  # noqa: F401, I001 - first: it pins numpy's and torch's CPU kernels before they load (core.kernels)
import numpy as np
import pytest

from pipeline.core.config import Params, load_params
from pipeline.core.config import write_params as params_file

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
    "explain.per_outcome": 1,
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


PROTECTED = ("data", "models", "reports", "mlflow.db", "mlartifacts", "mlruns")


def _snapshot() -> dict[str, tuple[int, int]]:
    found = {}
    for name in PROTECTED:
        path = REPO / name
        for item in ([path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []):
            if item.is_file():
                stat = item.stat()
                found[item.relative_to(REPO).as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return found


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_REPO_STATE] = _snapshot()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before, after = session.config.stash.get(_REPO_STATE, {}), _snapshot()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        print(f"\nerror: the tests changed the repository's own outputs: {changed[:10]}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_REPO_STATE = pytest.StashKey[dict]()


@pytest.fixture(autouse=True)
def _work_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test's working directory is its own temporary folder, never the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def params(tmp_path: Path) -> Params:
    return tiny_params(tmp_path)


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    """The tiny phantom prepared into ``tmp_path/prepared``."""
    from pipeline import prepare

    prepare.run(tiny_params(tmp_path), tmp_path / "prepared", tmp_path / "summary.json")
    return tmp_path


@pytest.fixture
def balanced(prepared: Path) -> Path:
    """``prepared`` plus its default balanced training set in ``tmp_path/balanced``."""
    from pipeline import balance

    balance.run(tiny_params(prepared), prepared / "prepared", prepared / "balanced", prepared / "balance.json")
    return prepared


def run_stages(root: Path, params: Params, stages: tuple[str, ...]) -> None:
    """Run stage ``run`` functions in ``root`` (their default paths are relative)."""
    import importlib

    with contextlib.chdir(root):
        for stage in stages:
            importlib.import_module(f"pipeline.{stage}").run(params)


def first_epoch_loss(history: Path) -> float:
    """The first epoch's training loss in a train stage's ``history.csv``."""
    with open(history) as handle:
        return float(next(csv.DictReader(handle))["train_loss"])


def run_train(root: Path, out: str, **overrides: Any) -> dict[str, Any]:
    """Train on ``root``'s prepared and balanced sets (the ``balanced`` fixture) into ``root/out``."""
    from pipeline import train

    params = tiny_params(root, **overrides)
    return train.run(params, root / "prepared", root / "balanced", root / out / "model.pt", root / out,
                     root / out / "last.pt")


# Class names are data: every one of these must survive metric names, the report and the registry.
AWKWARD_CLASS_NAMES = ("viral (pneumonia)", "covid+", "正常", "médico 50%/a.b", "<img src=x onerror=alert(1)>")
# The tiny run's external validation site: the phantom's shifted scanner, part of it recalibrated on.
SITE_C = {"name": "site_c", "source": "phantom", "recalibrate": 0.3}
STAGES_TO_REPORT = ("prepare", "balance", "train", "evaluate", "explain", "report")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Params]:
    """prepare → balance → train → evaluate → explain → report on the tiny phantom, once per session."""
    root = tmp_path_factory.mktemp("tiny_run")
    params = tiny_params(root, **{"evaluate.external": [SITE_C]})
    run_stages(root, params, STAGES_TO_REPORT)
    return root, params


@pytest.fixture(scope="session")
def rgb_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Params]:
    """The same stages on a 5-class RGB MedMNIST-format file: multi-class, 3 channels, no masks, no phantom."""
    root = tmp_path_factory.mktemp("rgb_run")
    path = make_npz(root / "rgb5.npz", n=(100, 30, 40), classes=5, size=16, channels=3)
    site = make_npz(root / "hospital_b.npz", n=(5, 5, 30), classes=5, size=16, channels=3, seed=1)
    params = tiny_params(root, **{"data.source": "npz", "data.path": str(path),
                                  "data.class_names": list(AWKWARD_CLASS_NAMES),
                                  "evaluate.external": [{"name": "hospital_b", "source": "npz", "path": str(site),
                                                         "split": "test"}]})
    run_stages(root, params, STAGES_TO_REPORT)
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def need_service(available: bool, what: str) -> None:
    """Skip a test whose service is not installed here; in CI (``MEDCNN_REQUIRE_SERVICES=1``,
    set by .ci/run after installing them) fail instead, so a missing install never hides."""
    if not available:
        if os.environ.get("MEDCNN_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{what} is required in CI but not installed")
        pytest.skip(f"{what} not installed (.ci/run installs it)")


@dataclasses.dataclass
class TrackingServer:
    """A PostgreSQL-backed MLflow server started by scripts/mlflow-server.sh, as `make mlflow-server` does."""

    uri: str
    env: dict[str, str]

    def script(self, action: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(REPO / "scripts/mlflow-server.sh"), action], env=self.env, capture_output=True,
                              text=True, timeout=300)


@contextlib.contextmanager
def tracking_server() -> Iterator[TrackingServer]:
    need_service(bool(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")), "PostgreSQL (Debian package postgresql)")
    # Not under pytest's 0700 temp root: Debian's postgres user, which runs the cluster when the
    # tests run as root, must reach the folder.
    folder = Path(tempfile.mkdtemp(prefix="medcnn-mlflow-server-"))
    folder.chmod(0o755)
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_DIR": str(folder), "MLFLOW_PORT": str(port),
           "MLFLOW_PG_PORT": str(free_port()), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = TrackingServer(f"http://127.0.0.1:{port}", env)
    started = server.script("start")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield server
    finally:
        server.script("stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server() -> Iterator[TrackingServer]:
    """One tracking server for the session (about 20 s to start on a new database)."""
    with tracking_server() as server:
        yield server
