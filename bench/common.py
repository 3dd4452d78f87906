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
from pathlib import Path
from typing import Any

from pipeline.core.config import write_params

REPO = Path(__file__).resolve().parents[1]


def copy_project(dest: Path, overrides: dict[str, Any], source: Path = REPO) -> dict[str, str]:
    """The project's files (as git sees them, without dvc.lock) in ``dest``, params overridden, committed.

    Returns the environment to run DVC in there. A ``*.path`` param is made absolute: it is
    relative to the repository, not to the temporary copy.
    """
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=source,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (source / name).is_file() and name != "dvc.lock":
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, dest / name)
    values = {k: str((source / str(v)).resolve()) if k.endswith(".path") and v else v for k, v in overrides.items()}
    write_params(dest / "params.yaml", values, dest / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@local",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@local"}
    for variable in ("DVC_ROOT", "DVC_EXP_NAME"):
        env.pop(variable, None)
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(command, cwd=dest, env=env, check=True, capture_output=True)
    return env
