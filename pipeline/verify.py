"""``make verify``: rerun the committed pipeline on this machine and compare every output with ``dvc.lock``.

A reviewer's one command. The commit (``HEAD``, or ``--revision``) is copied into a temporary
folder (:mod:`pipeline.core.workspace`: the workspace, its outputs and its MLflow store are
never touched), ``dvc repro`` runs there up to the report, and each output's md5 is compared
with the one the commit's ``dvc.lock`` records, output by output. Outputs that hold wall-clock
times, this machine's paths or the copy's own commit are listed as not compared, with the
reason; ``track`` is not rerun (it only logs to MLflow, and its output is the run's id).

Prints a table, the CPU and the kernels this machine ran (:mod:`pipeline.core.kernels`), and a
one-line verdict. Exit status 0 when every compared output matches, 1 when one differs.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pipeline.core import kernels, paths
from pipeline.core.errors import PipelineError
from pipeline.core.files import read_json
from pipeline.core.runtime import run_command
from pipeline.core.workspace import REPO, copy_project

LAST_STAGE = "report"  # track only logs to MLflow
# Outputs whose bytes are this run's own, whatever the kernels: never a reproducibility failure.
NOT_COMPARED = {
    str(paths.SOURCE): "fingerprint of the input: its paths and modification times on this machine",
    str(paths.TRAIN_DIR / paths.TIMING): "wall-clock times and the machine that ran",
    str(paths.EVAL_DIR / paths.TIMING): "wall-clock times",
    str(paths.EXPLAIN_DIR / paths.TIMING): "wall-clock times",
    str(paths.REPORT_HTML): "shows the run's times, machine and git commit",
    str(paths.MLFLOW_RUN): "the id of the MLflow run (track is not rerun)",
}


def outputs(lock: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """{output path: (stage, md5)} for every output a ``dvc.lock`` records."""
    return {out["path"]: (stage, out.get("md5", "")) for stage, entry in lock.get("stages", {}).items()
            for out in entry.get("outs", [])}


def committed_lock(revision: str, repo: Path = REPO) -> dict[str, Any]:
    """The ``dvc.lock`` committed at ``revision``."""
    shown = subprocess.run(["git", "show", f"{revision}:{paths.DVC_LOCK}"], cwd=repo, capture_output=True, text=True)
    if shown.returncode:
        raise PipelineError(f"{paths.DVC_LOCK}: not committed at {revision} ({shown.stderr.strip()})")
    return yaml.safe_load(shown.stdout)


def compare(committed: dict[str, Any], rerun: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(stage, output, committed md5, rerun md5, verdict) for every committed output, in pipeline order;
    verdict is ``same``, ``DIFFERS``, ``missing`` or ``not compared: <why>``."""
    new = outputs(rerun)
    rows = []
    for path, (stage, md5) in outputs(committed).items():
        again = new.get(path, ("", ""))[1]
        if path in NOT_COMPARED:
            verdict = f"not compared: {NOT_COMPARED[path]}"
        elif not again:
            verdict = "missing"
        else:
            verdict = "same" if again == md5 else "DIFFERS"
        rows.append((stage, path, md5, again, verdict))
    return rows


def table(rows: list[tuple[str, str, str, str, str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(2)]
    lines = [f"{'stage':<{widths[0]}}  {'output':<{widths[1]}}  {'committed':<10}  {'this run':<10}  result"]
    lines += [f"{s:<{widths[0]}}  {p:<{widths[1]}}  {a[:10]:<10}  {b[:10]:<10}  {v}" for s, p, a, b, v in rows]
    return "\n".join(lines)


def verdict(rows: list[tuple[str, str, str, str, str]]) -> tuple[bool, str]:
    compared = [r for r in rows if not r[4].startswith("not compared")]
    same = sum(r[4] == "same" for r in compared)
    ok = same == len(compared)
    return ok, (f"{'reproduced' if ok else 'NOT reproduced'}: {same} of {len(compared)} outputs identical to the "
                f"committed dvc.lock ({len(rows) - len(compared)} not compared)")


def machine_line(found: dict[str, Any]) -> str:
    """What trained the rerun's model (its ``timing.json`` record) and where its bytes hold."""
    return (f"this machine: {found['cpu']} ({found['cpu_flags']}), {found['mode']} kernels, {found['threads']} "
            f"thread(s); these bytes hold on {kernels.scope(found)}")


def run(revision: str = "HEAD", keep: Path | None = None) -> bool:
    committed = committed_lock(revision)
    with tempfile.TemporaryDirectory(prefix="medcnn-verify-") as tmp:
        root = keep or Path(tmp)
        print(f"copying {revision} to {root} and running `dvc repro {LAST_STAGE}` there", flush=True)
        env = copy_project(root, revision=revision)
        done = subprocess.run(["dvc", "repro", LAST_STAGE], cwd=root, env=env)
        if done.returncode:
            raise PipelineError(f"dvc repro failed in {root} (exit status {done.returncode})")
        rows = compare(committed, yaml.safe_load((root / paths.DVC_LOCK).read_text()))
        trained = read_json(root / paths.TRAIN_DIR / paths.TIMING)["kernels"]
    print()
    print(table(rows))
    print()
    print(machine_line(trained))
    ok, line = verdict(rows)
    print(line)
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revision", default="HEAD", help="the commit to verify (default: HEAD)")
    parser.add_argument("--keep", type=Path, help="run in this (empty) folder and keep it, instead of a temporary one")
    args = parser.parse_args()
    run_command(lambda: 0 if run(args.revision, args.keep) else 1)


if __name__ == "__main__":
    main()
