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
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.config import write_params

REPO = Path(__file__).resolve().parents[1]


def copy_project(dest: Path, overrides: dict[str, Any]) -> dict[str, str]:
    """The project's files (as git sees them, without dvc.lock) in ``dest``, params overridden, committed.

    Returns the environment to run DVC in there. A ``*.path`` param is made absolute: it is
    relative to the repository, not to the temporary copy.
    """
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file() and name != "dvc.lock":
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return _commit(dest, overrides)


def copy_revision(dest: Path, revision: str, overrides: dict[str, Any]) -> dict[str, str]:
    """The project as committed at ``revision`` (``git archive``, without dvc.lock) in ``dest``,
    params overridden, committed, as :func:`copy_project` does."""
    import tarfile
    from io import BytesIO

    archive = subprocess.run(["git", "archive", revision], cwd=REPO, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as files:
        files.extractall(dest, filter="data")
    (dest / "dvc.lock").unlink(missing_ok=True)
    return _commit(dest, overrides)


def _commit(dest: Path, overrides: dict[str, Any]) -> dict[str, str]:
    """Override ``dest``'s params, commit it as a fresh repository, and return the environment
    to run DVC in there."""
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


def stage_names(root: Path = REPO) -> list[str]:
    """The stages of ``root``'s dvc.yaml, in pipeline order."""
    return list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])


def stage_times(root: Path, env: dict[str, str]) -> dict[str, float]:
    """Wall seconds of each stage of ``root``'s dvc.yaml, in order, each run with `dvc repro -f -s`
    (so each time includes DVC's own start-up)."""
    seconds = {}
    for stage in stage_names(root):
        start = time.perf_counter()
        subprocess.run(["dvc", "repro", "-f", "-s", stage], cwd=root, env=env, check=True, capture_output=True)
        seconds[stage] = time.perf_counter() - start
    return seconds


def alternate(copies: dict[str, tuple[Path, dict[str, str]]], rounds: int,
              once: tuple[str, ...] = ()) -> dict[str, dict[str, float]]:
    """Each copy's mean :func:`stage_times` over ``rounds``, the copies taking turns within a round
    (the machine's drift then touches all alike); the ``once`` copies run in the first round only."""
    times: dict[str, list[dict[str, float]]] = {name: [] for name in copies}
    for r in range(rounds):
        for name, (root, env) in copies.items():
            if r and name in once:
                continue
            times[name].append(stage_times(root, env))
            print(f"round {r + 1}: {name} {sum(times[name][-1].values()):.0f} s", file=sys.stderr, flush=True)
    return {name: {stage: sum(t[stage] for t in runs) / len(runs) for stage in runs[0]} for name, runs in times.items()}


def print_stage_table(before: str, old: dict[str, float], after: str, new: dict[str, float], rounds: int) -> None:
    """Per-stage mean seconds and share of two pipelines, and their ratio, as a Markdown table
    (a stage only one of them has shows a dash on the other side)."""
    print(f"| stage | {before} s | share | {after} s | share | {after} / {before} |   (mean of {rounds} round(s))")
    print("|---|---|---|---|---|---|")
    for stage in [*new, *(s for s in old if s not in new), "total"]:
        a = sum(old.values()) if stage == "total" else old.get(stage)
        b = sum(new.values()) if stage == "total" else new.get(stage)
        cells = [f"{v:.1f} | {v / sum(side.values()):.0%}" if v is not None else "– | –" for v, side in ((a, old), (b, new))]
        print(f"| {stage} | {cells[0]} | {cells[1]} | {f'{b / a:.2f}' if a and b else '–'} |")


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
    """Wall seconds and peak RSS (MB) of ``python -m pipeline.<stage>`` in ``work`` with ``code``
    first on the path (before any ``PYTHONPATH`` already set, e.g. carried packages); None when
    the kernel killed it for memory (an older commit's in-memory loop)."""
    path = os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(work / "hwm"), f"pipeline.{stage}"], cwd=work, check=False,
                          env={**os.environ, "PYTHONPATH": path, "MEDCNN_LOG_LEVEL": "WARNING"})
    if done.returncode == -9:
        return None
    if done.returncode:
        raise SystemExit(f"pipeline.{stage} failed with exit status {done.returncode}")
    return time.perf_counter() - start, int((work / "hwm").read_text()) / 1024
