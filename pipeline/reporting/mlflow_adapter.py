"""The only module that imports MLflow.

Store: ``$MLFLOW_TRACKING_URI`` when set (a team's server, say), else SQLite at
``<repository root>/mlflow.db`` with artifacts in ``<root>/mlartifacts``. The root is
``$DVC_ROOT`` when DVC sets it, so ``dvc exp run --temp/--queue``, which run in a temporary
copy of the repository, log into the same store as ``dvc repro``.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def repository_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repository_root() / 'mlflow.db'}"


def log_run(experiment: str, run_name: str | None, params: Mapping[str, Any], metrics: Mapping[str, float],
            step_metrics: Iterable[tuple[int, Mapping[str, float]]], tags: Mapping[str, str],
            artifacts: Iterable[tuple[Path, str]], texts: Mapping[str, str] | None = None) -> dict[str, str]:
    """Create one run holding everything; returns its ids and the store it went to.

    ``artifacts`` are (local path, artifact folder) pairs; folders are logged recursively.
    ``texts`` are logged as files named by their keys (copies edited before they leave).
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    default_store = "MLFLOW_TRACKING_URI" not in os.environ  # read before set_tracking_uri sets it
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        # Only the default local store needs an absolute artifact folder: MLflow's default is
        # relative to the working directory, which under `dvc exp run --temp` is thrown away.
        location = (repository_root() / "mlartifacts").as_uri() if default_store else None
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    else:
        experiment_id = found.experiment_id
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
        mlflow.log_params({k: _param(v) for k, v in params.items()})
        mlflow.log_metrics(dict(metrics))
        for step, values in step_metrics:
            mlflow.log_metrics(dict(values), step=step)
        mlflow.set_tags(dict(tags))
        for path, folder in artifacts:
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=folder)
            elif path.is_file():
                mlflow.log_artifact(str(path), artifact_path=folder or None)
        for name, text in (texts or {}).items():
            mlflow.log_text(text, name)
        return {"run_id": run.info.run_id, "experiment_id": experiment_id, "tracking_uri": redact_uri(uri)}


def _param(value: Any) -> str:
    return "null" if value is None else str(value)


_SECRET_QUERY_KEYS = ("password", "pass", "pwd", "token")


def redact_uri(uri: str) -> str:
    """``uri`` without credentials (``user:password@host``, ``?password=``), fit to be written anywhere.

    Parsed with ``urllib.parse``, so an ``@`` in a path (``sqlite:////data/a@b/mlflow.db``) is
    left alone.
    """
    parts = urllib.parse.urlsplit(uri)
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    secret_query = any(k.lower() in _SECRET_QUERY_KEYS for k, _ in pairs)
    if "@" not in parts.netloc and not secret_query:
        return uri
    netloc = "***@" + parts.netloc.rsplit("@", 1)[1] if "@" in parts.netloc else parts.netloc
    query = urllib.parse.urlencode([(k, "***" if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in pairs],
                                   safe="*") if secret_query else parts.query
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))
