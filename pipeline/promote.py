"""Move the MLflow registry's ``champion`` alias: ``python -m pipeline.promote [--version N] [--force]``.

Promotes version N of ``track.registered_model`` (the newest when ``--version`` is not
given), after printing its test metrics next to the current champion's. A version whose
class list or input shape differs from the champion's is refused unless ``--force``: clients
of ``models:/<name>@champion`` would otherwise get answers in another format overnight.
Served models follow the alias: ``mlflow models serve -m models:/medcnn@champion``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline.core import paths
from pipeline.core.config import load_params
from pipeline.core.errors import PipelineError
from pipeline.core.runtime import run_command
from pipeline.evaluation.metrics import COMPARISON
from pipeline.reporting import mlflow_adapter

INCOMPATIBLE = ("classes", "input_shape")


def compare(candidate: dict[str, Any], champion: dict[str, Any] | None) -> str:
    """A table of test metrics: the candidate beside the current champion."""
    def value(entry: dict[str, Any] | None, key: str) -> str:
        found = entry["metrics"].get(f"test.{key}") if entry else None
        return "n/a" if found is None else f"{found:.4f}"

    title = f"current champion (v{champion['version']})" if champion else "current champion (none)"
    lines = [f"{'test metric':<20}{'v' + candidate['version']:>12}{title:>34}"]
    lines += [f"{key:<20}{value(candidate, key):>12}{value(champion, key):>34}" for key in COMPARISON]
    return "\n".join(lines)


def promote(name: str, version: str | None = None, force: bool = False) -> dict[str, Any]:
    versions = mlflow_adapter.model_versions(name)
    if not versions:
        raise PipelineError(f"no registered model '{name}' in {mlflow_adapter.redact_uri(mlflow_adapter.tracking_uri())}"
                            " (run the pipeline: its track stage registers a version per execution)")
    by_number = {v["version"]: v for v in versions}
    candidate = by_number.get(version or versions[0]["version"])
    if candidate is None:
        raise PipelineError(f"'{name}' has no version {version} (versions: {', '.join(by_number)})")
    champion = next((v for v in versions if mlflow_adapter.CHAMPION in v["aliases"]), None)
    print(compare(candidate, champion))
    if champion and champion["version"] == candidate["version"]:
        print(f"version {candidate['version']} is already the champion")
        return candidate
    changed = [key for key in INCOMPATIBLE
               if champion and candidate["tags"].get(key) != champion["tags"].get(key)]
    if changed and not force:
        details = "; ".join(f"{k}: {champion['tags'].get(k)} -> {candidate['tags'].get(k)}" for k in changed)
        raise PipelineError(f"version {candidate['version']} differs from the champion in {details}; clients of the "
                            "champion would get answers in another format (pass --force to promote anyway)")
    mlflow_adapter.set_champion(name, candidate["version"])
    print(f"'{name}@{mlflow_adapter.CHAMPION}' now points to version {candidate['version']}")
    return candidate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", help="version to promote (default: the newest)")
    parser.add_argument("--force", action="store_true", help="promote even if classes or input shape change")
    parser.add_argument("--params", type=Path, default=paths.PARAMS, help="params file (track.registered_model)")
    args = parser.parse_args()
    run_command(lambda: promote(load_params(args.params).track.registered_model, args.version, args.force) and None)


if __name__ == "__main__":
    main()
