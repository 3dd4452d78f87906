"""Where a run came from: git commit and dirty flag, DVC experiment and its start, software and hardware.

Shared by the report (for reviewers) and the track stage (as MLflow tags). Nothing here
reads data, so no patient information can leak through it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "numpy", "scikit-learn", "imbalanced-learn", "captum", "mlflow", "dvc", "matplotlib", "scipy")


def git_state(root: str | Path = ".") -> dict[str, str | bool | None]:
    """HEAD commit and whether the tracked tree differs from it (always true after ``dvc exp run -S``)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def dvc_experiment() -> dict[str, str | None]:
    """Set by DVC for ``dvc exp run`` (also under ``--temp``/``--queue``); absent for ``dvc repro``."""
    return {key.lower(): os.environ.get(key) for key in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV")}


def execution_started() -> float | None:
    """When the DVC command running this stage began (epoch seconds), or None outside DVC.

    The MLflow run stands for the whole pipeline execution, not for the logging call: its
    start is that of the nearest ``dvc`` ancestor process (``dvc repro``, ``dvc exp run``, or the
    per-experiment process of a queue worker), read from /proc (Linux; None elsewhere).
    """
    try:
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        ticks = os.sysconf("SC_CLK_TCK")
        pid = os.getppid()
        for _ in range(12):
            if pid <= 1:
                return None
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
            words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if any(Path(w.decode(errors="replace")).name == "dvc" for w in words[:3]) or b"dvc.cli" in b" ".join(words):
                return boot + int(fields[19]) / ticks  # field 22 of /proc/<pid>/stat: start time in clock ticks
            pid = int(fields[1])  # the parent
    except (OSError, ValueError, StopIteration, IndexError):
        return None
    return None


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def hardware() -> dict[str, str | int | None]:
    info: dict[str, str | int | None] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if "torch" in sys.modules:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info
