"""What the benchmarks share: a git + DVC copy of the project in a temporary folder.

Benchmarks never touch the workspace, its outputs or its MLflow store: each works in a copy
of the files git sees, with its own params, committed in a fresh repository (DVC experiments
need a commit).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.config import write_params

REPO = Path(__file__).resolve().parents[1]


def copy_project(dest: Path, overrides: dict[str, Any], source: Path = REPO, tracked: bool = True) -> dict[str, str]:
    """The project's files (as git sees them, without dvc.lock) in ``dest``, params overridden, committed.

    Returns the environment to run DVC in there. A ``*.path`` param is made absolute: it is
    relative to the repository, not to the temporary copy. ``tracked=False`` copies every file
    of ``source`` (an exported tree, which is no repository).
    """
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=source,
                           capture_output=True, text=True, check=True).stdout.split() if tracked else [
        str(f.relative_to(source)) for f in source.rglob("*") if f.is_file()]
    for name in files:
        if (source / name).is_file() and name != "dvc.lock":
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, dest / name)
    values = {k: str((REPO / str(v)).resolve()) if k.endswith(".path") and v else v for k, v in overrides.items()}
    write_params(dest / "params.yaml", values, dest / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@local",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@local"}
    for variable in ("DVC_ROOT", "DVC_EXP_NAME"):
        env.pop(variable, None)
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(command, cwd=dest, env=env, check=True, capture_output=True)
    return env


def copy_revision(dest: Path, revision: str, overrides: dict[str, Any]) -> dict[str, str]:
    """The project as committed at ``revision`` (``git archive``) in ``dest``, made a repository
    of its own as :func:`copy_project` does; returns the environment to run DVC in there."""
    import tarfile
    from io import BytesIO

    archive = subprocess.run(["git", "archive", revision], cwd=REPO, capture_output=True, check=True).stdout
    with tempfile.TemporaryDirectory() as tree, tarfile.open(fileobj=BytesIO(archive)) as files:
        files.extractall(tree, filter="data")
        return copy_project(dest, overrides, Path(tree), tracked=False)


def stage_times(root: Path, env: dict[str, str]) -> dict[str, float]:
    """Wall seconds of each stage of ``root``'s dvc.yaml, in order, each run with `dvc repro -f -s`
    (so each time includes DVC's own start-up)."""
    stages = list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])
    seconds = {}
    for stage in stages:
        start = time.perf_counter()
        subprocess.run(["dvc", "repro", "-f", "-s", stage], cwd=root, env=env, check=True, capture_output=True)
        seconds[stage] = time.perf_counter() - start
    return seconds


# Runs a stage and, at exit, records its own peak RSS (VmHWM): getrusage's ru_maxrss can carry
# the parent's peak after fork + exec.
_PEAK_RSS = """
import atexit, runpy, sys
out, stage = sys.argv[1], sys.argv[2]
def record():
    hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
    open(out, 'w').write(hwm)
atexit.register(record)
sys.argv = [stage]
runpy.run_module(stage, run_name='__main__')
"""


def run_stage(work: Path, stage: str, code: Path = REPO) -> tuple[float, float] | None:
    """Wall seconds and peak RSS (MB) of ``python -m pipeline.<stage>`` in ``work`` with ``code`` on
    the path; None when the kernel killed it for memory (an older commit's in-memory loop)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(work / "hwm"), f"pipeline.{stage}"], cwd=work,
                          env={**os.environ, "PYTHONPATH": str(code), "MEDCNN_LOG_LEVEL": "WARNING"})
    if done.returncode == -9:
        return None
    if done.returncode:
        raise SystemExit(f"pipeline.{stage} failed with exit status {done.returncode}")
    return time.perf_counter() - start, int((work / "hwm").read_text()) / 1024
