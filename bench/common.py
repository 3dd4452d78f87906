"""What the benchmarks share: a git + DVC copy of the project in a temporary folder, stage timings, tables.

Benchmarks never touch the workspace, its outputs or its MLflow store: each works in a copy
made by :mod:`pipeline.core.workspace` (the helper the end-to-end tests and ``make verify`` use),
which logs to the copy's own MLflow store even when a team server is exported.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pipeline.core.workspace import REPO


def provenance() -> str:
    """The line every benchmark prints above its table: when, on what, at which commit and with
    which kernels it was measured, so a table pasted into the docs says where it came from."""
    import datetime
    import platform

    from pipeline.core import kernels

    cpu = kernels.cpu()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    return (f"Measured {datetime.date.today().isoformat()} on {cpu['model']} ({os.cpu_count()} cores, "
            f"{' '.join(cpu['flags'])}), {platform.system()} {platform.machine()}, medcnn {commit.strip()}"
            f"{' with uncommitted changes' if dirty else ''}, {kernels.mode()} kernels.")


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
