"""A git + DVC copy of the project in another folder: where ``make verify``, the benchmarks and
the end-to-end tests run the pipeline, so the user's workspace, outputs and MLflow store are
never touched.

The copy holds the files git sees (or the files of a commit), without ``dvc.lock`` and the
outputs committed beside it (the pipeline it reruns writes its own), with params overridden, committed as a fresh repository
(DVC experiments need a commit). Its environment runs this interpreter's tools, imports the
copy's own code, and logs MLflow runs to the copy's own store: a team server exported in
``MLFLOW_TRACKING_URI`` is left out, as are the variables DVC sets for the experiment around it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from io import BytesIO
from pathlib import Path
from typing import Any

import yaml

from pipeline.core import kernels
from pipeline.core.config import write_params

REPO = Path(__file__).resolve().parents[2]
# Variables that would make a copy log elsewhere, or believe it runs inside another DVC experiment.
FOREIGN = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "DVC_ROOT", "DVC_EXP_NAME",
           "DVC_EXP_BASELINE_REV", "DVC_STAGE")
IDENTITY = {"GIT_AUTHOR_NAME": "medcnn", "GIT_AUTHOR_EMAIL": "medcnn@localhost",
            "GIT_COMMITTER_NAME": "medcnn", "GIT_COMMITTER_EMAIL": "medcnn@localhost"}


def tracked_files(repo: Path = REPO) -> list[str]:
    """The project's files as git sees them: committed or new, never ignored ones."""
    return subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=repo,
                          capture_output=True, text=True, check=True).stdout.split()


def stage_outputs(root: Path) -> set[str]:
    """Every path ``root``'s dvc.yaml declares as an output (outs, metrics, plots)."""
    stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {})
    return {next(iter(out)) if isinstance(out, dict) else out for stage in stages.values()
            for kind in ("outs", "metrics", "plots") for out in stage.get(kind, [])}


def copy_project(dest: Path, overrides: dict[str, Any] | None = None, revision: str | None = None,
                 repo: Path = REPO) -> dict[str, str]:
    """Copy the project into ``dest`` (the working tree as git sees it, or the commit ``revision``),
    without ``dvc.lock`` and the stage outputs committed beside it (the pipeline the copy runs
    writes its own), apply the params ``overrides`` (a ``*.path`` value is made absolute: it is
    relative to the repository, not to the copy), commit, and return the environment to run DVC
    and the stages in there."""
    dest.mkdir(parents=True, exist_ok=True)
    if revision:
        archive = subprocess.run(["git", "archive", revision], cwd=repo, capture_output=True, check=True).stdout
        with tarfile.open(fileobj=BytesIO(archive)) as files:
            files.extractall(dest, filter="data")
    else:
        for name in tracked_files(repo):
            if (repo / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(repo / name, dest / name)
    for output in map(dest.joinpath, stage_outputs(dest)):
        if output.is_dir():
            shutil.rmtree(output)
        else:
            output.unlink(missing_ok=True)
    (dest / "dvc.lock").unlink(missing_ok=True)
    values = {k: str((repo / str(v)).resolve()) if k.endswith(".path") and v else v
              for k, v in (overrides or {}).items()}
    write_params(dest / "params.yaml", values, dest / "params.yaml")
    env = environment(dest)
    for command in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(command, cwd=dest, env=env, check=True, capture_output=True)
    return env


def environment(root: Path) -> dict[str, str]:
    """This process's environment, fitted to run the copy at ``root`` (see the module docstring).

    The kernel switches this process set on itself (importing ``pipeline`` sets them) are left
    out too: the copy's own code decides them, so an older revision runs as it did."""
    env = {**os.environ, **IDENTITY, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(root), "DVC_NO_ANALYTICS": "1"}
    for variable in (*FOREIGN, *kernels.PORTABLE_ENV):
        env.pop(variable, None)
    return env
