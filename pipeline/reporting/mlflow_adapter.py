"""The only module that imports MLflow: runs, the logged and registered model, the champion alias.

Store: ``$MLFLOW_TRACKING_URI`` when set (a team's server, say), else SQLite at
``<repository root>/mlflow.db`` with artifacts in ``<root>/mlartifacts``. The root is
``$DVC_ROOT`` when DVC sets it, so ``dvc exp run --temp/--queue``, which run in a temporary
copy of the repository, log into the same store as ``dvc repro``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.core.errors import PipelineError

log = logging.getLogger(__name__)


def repository_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repository_root() / 'mlflow.db'}"


CHAMPION = "champion"
# One dotted segment of a metric name: what MLflow accepts on every platform, less its separator.
_SAFE_SEGMENT = re.compile(r"[\w\- ]+")
# What the logged model needs to score images: the packages its loader module imports.
MODEL_REQUIREMENTS = ("torch", "numpy", "scipy", "pandas", "pyyaml", "monai")  # monai: its networks' code


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model package to log as an MLflow Model and register as a new version of ``registered_name``."""

    package: Path
    input_shape: tuple[int, ...]  # H, W, C (volumes: D, H, W, C)
    class_names: list[str]
    registered_name: str = ""
    version_tags: dict[str, str] = dataclasses.field(default_factory=dict)


def metric_key(segments: tuple[str, ...]) -> str:
    """A valid, stable, collision-free MLflow metric name for a path of keys.

    Keys written by the project are kept. A key that comes from the data (a class name, a
    subgroup) and holds a character MLflow refuses in names, or a dot (the separator), is
    replaced by its allowed characters plus the first 8 hex digits of its sha256: stable
    across runs, and two names never collide. ``viral (pneumonia)`` becomes
    ``viral _pneumonia_-3f1c2a9b``; letters of any script are kept (``正常``).
    """
    return ".".join(segment if _SAFE_SEGMENT.fullmatch(segment) else
                    re.sub(r"[^\w\- ]", "_", segment) + "-" + hashlib.sha256(segment.encode()).hexdigest()[:8]
                    for segment in segments)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One prepared split (or external set) as an MLflow dataset input: no data is uploaded, only
    what identifies it: name, digest (the prepared arrays' sha256), source and shape."""

    name: str  # e.g. pneumoniamnist-train
    sha256: str  # of the prepared arrays (see pipeline.prepare); MLflow keeps its first 36 characters
    source: str  # a file:// URI of the input, or the generator (module) that made it
    context: str  # train | validation | test | external
    shape: tuple[int, ...]  # one image: (C, H, W) or (C, D, H, W)
    rows: int


@dataclasses.dataclass(frozen=True)
class ChildRecord:
    """A run nested under the execution's run in the MLflow UI: one fold of a cross-validation."""

    name: str
    params: Mapping[str, Any]
    metrics: Mapping[str, float]
    step_metrics: Iterable[tuple[int, Mapping[str, float]]]


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """Everything one pipeline execution logs as one MLflow run."""

    experiment: str
    name: str
    execution: str  # identifies the execution: one FINISHED run per value, ever
    started: float | None  # when the execution began (epoch seconds); None: when logging begins
    description: str  # the run's note, shown first in the MLflow UI (headline metrics)
    params: Mapping[str, Any]
    metrics: Mapping[str, float]
    step_metrics: Iterable[tuple[int, Mapping[str, float]]]
    tags: Mapping[str, str]
    artifacts: Iterable[tuple[Path, str]]  # (local path, artifact folder); folders logged recursively
    texts: Mapping[str, str]  # logged as files named by their keys (copies edited before they leave)
    model: ModelSpec | None = None
    datasets: Iterable[DatasetSpec] = ()  # the run's inputs: MLflow's Dataset column and filters
    children: Iterable[ChildRecord] = ()  # nested runs (cv.folds: one per fold), logged after the parent's contents


EXECUTION_TAG = "medcnn.execution"
# Marks the experiment as model training for MLflow UIs that pick its page by kind (3.17 goes by
# a global GenAI / Model training toggle instead: links carry ?workflowType=machine_learning).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# Bounded HTTP: MLflow's defaults retry for minutes before a dead server is reported.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
HEALTH_ATTEMPTS, HEALTH_TIMEOUT = 3, 5.0
DIGEST_CHARS = 36  # MLflow stores a dataset digest in at most 36 characters (the full sha256 is an input tag)
# MLflow's own source tags, which fill the runs table's Source column (a run made with
# MlflowClient.create_run gets none by itself).
SOURCE_NAME, SOURCE_TYPE, SOURCE_COMMIT = "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit"


def log_run(record: RunRecord) -> dict[str, str]:
    """Log one execution as one FINISHED run; returns its ids and the store it went to.

    - An unreachable server is one :class:`PipelineError` naming the URI (credentials removed)
      within about ``HEALTH_ATTEMPTS × HEALTH_TIMEOUT`` seconds, before anything is written.
    - Runs of the same execution left RUNNING by an attempt that died half-way (the server went
      down during the upload) are marked FAILED first; a FINISHED run of the same execution is
      returned as it is, so a rerun never logs an execution twice.
    - A local SQLite store is written under an exclusive file lock: parallel queue workers
      would otherwise race to create its schema or hit "database is locked".
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    uri = tracking_uri()
    check_reachable(uri)
    default_store = "MLFLOW_TRACKING_URI" not in os.environ  # read before set_tracking_uri sets it
    with _store_lock(uri):
        try:
            mlflow.set_tracking_uri(uri)
            client = MlflowClient(uri)
            experiment_id = _experiment(client, record.experiment, default_store)
            done = _settle_earlier_attempts(client, experiment_id, record.execution)
            if done is not None:
                log.info("execution %s is already logged as run %s: not logging it twice", record.execution[:12],
                         done.info.run_id)
                return {"run_id": done.info.run_id, "experiment_id": experiment_id, "tracking_uri": redact_uri(uri),
                        **_registered(client, done.info.run_id)}
            run = client.create_run(experiment_id, run_name=record.name,
                                    start_time=int(record.started * 1000) if record.started else None,
                                    tags={EXECUTION_TAG: record.execution, "mlflow.note.content": record.description})
            with mlflow.start_run(run_id=run.info.run_id):  # FINISHED on success, FAILED on an exception
                result = {"run_id": run.info.run_id, "experiment_id": experiment_id, "tracking_uri": redact_uri(uri)}
                mlflow.log_params({k: _param(v) for k, v in record.params.items()})
                # The model first, then the metrics linked to it in one batch: a model logged after
                # 400 metrics reads each one's history back to link it (a request per metric).
                if record.model is not None:
                    result.update(log_model(record.model))
                _log_contents(record, result.get("model_id"))
            return result
        except (MlflowException, OSError) as exc:
            raise PipelineError(f"MLflow store {redact_uri(uri)} failed while logging ({type(exc).__name__}: "
                                f"{_first_line(exc)}). Every other output is kept; once the store answers, "
                                "`dvc repro` reruns only the logging, and an incomplete run is marked FAILED."
                                ) from None


def check_reachable(uri: str) -> None:
    """For an HTTP server: its /health answers, or one clear error within a bounded time."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    health = uri.rstrip("/") + "/health"
    for attempt in range(HEALTH_ATTEMPTS):
        try:
            with urllib.request.urlopen(health, timeout=HEALTH_TIMEOUT):
                return
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if attempt + 1 < HEALTH_ATTEMPTS:
                time.sleep(1.0)
    raise PipelineError(f"MLflow server {redact_uri(uri)} is unreachable ({reason}). Start it (`make mlflow-server`) "
                        "or point MLFLOW_TRACKING_URI at a running one; every other output of the pipeline is kept, "
                        "and `dvc repro` logs this execution once the server answers.")


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock beside a SQLite store's file, for the whole logging; nothing for a server."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    database = Path(urllib.parse.urlsplit(uri).path)
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _experiment(client: Any, name: str, default_store: bool) -> str:
    """The id of experiment ``name``, created (tagged as model development) when it is new.

    Two queue workers logging to one server can both find no experiment and both create it:
    the second gets RESOURCE_ALREADY_EXISTS and uses the one the first created.
    """
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        # Only the default local store needs an absolute artifact folder: MLflow's default is
        # relative to the working directory, which under `dvc exp run --temp` is thrown away.
        location = (repository_root() / "mlartifacts").as_uri() if default_store else None
        try:
            return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = client.get_experiment_by_name(name)
    for key, value in EXPERIMENT_KIND.items():
        if found.tags.get(key) != value:
            client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def _settle_earlier_attempts(client: Any, experiment_id: str, execution: str) -> Any:
    """Mark this execution's unfinished runs FAILED; return its FINISHED run if there is one."""
    runs = client.search_runs([experiment_id], f"tags.`{EXECUTION_TAG}` = '{execution}'")
    for run in runs:
        if run.info.status in ("RUNNING", "SCHEDULED"):
            log.warning("run %s of this execution was left %s by an interrupted attempt: marking it FAILED",
                        run.info.run_id, run.info.status)
            client.set_terminated(run.info.run_id, "FAILED")
    return next((run for run in runs if run.info.status == "FINISHED"), None)


def _log_contents(record: RunRecord, model_id: str | None) -> None:
    import mlflow

    mlflow.log_metrics(dict(record.metrics), model_id=model_id)
    for step, values in record.step_metrics:
        mlflow.log_metrics(dict(values), step=step)
    mlflow.set_tags(dict(record.tags))
    for dataset in record.datasets:
        mlflow.log_input(_dataset(dataset), context=dataset.context,
                         tags={"sha256": dataset.sha256, "images": str(dataset.rows)})
    for path, folder in record.artifacts:
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=folder)
        elif path.is_file():
            mlflow.log_artifact(str(path), artifact_path=folder or None)
    for name, text in record.texts.items():
        mlflow.log_text(text, name)
    experiment_id = mlflow.active_run().info.experiment_id  # a nested run would otherwise go to "Default"
    for child in record.children:
        # nested=True tags the run mlflow.parentRunId: the UI shows it under the execution's run
        with mlflow.start_run(run_name=child.name, nested=True, experiment_id=experiment_id):
            mlflow.log_params({k: _param(v) for k, v in child.params.items()})
            mlflow.log_metrics(dict(child.metrics))
            for step, values in child.step_metrics:
                mlflow.log_metrics(dict(values), step=step)


def _dataset(spec: DatasetSpec) -> Any:
    import numpy as np
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.types.schema import Schema, TensorSpec

    source = (LocalArtifactDatasetSource(spec.source) if spec.source.startswith("file:")
              else CodeDatasetSource({"generator": spec.source}))
    schema = Schema([TensorSpec(np.dtype(np.float32), (-1, *spec.shape), "image")])
    return MetaDataset(source, name=spec.name, digest=spec.sha256[:DIGEST_CHARS], schema=schema)


def _registered(client: Any, run_id: str) -> dict[str, str]:
    """The registered model version a run produced, if any."""
    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        return {"registered_model": version.name, "model_version": str(version.version)}
    return {}


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


@contextlib.contextmanager
def _pyfunc_arguments(spec: ModelSpec) -> Iterator[dict[str, Any]]:
    """What ``mlflow.pyfunc.log_model``/``save_model`` need for the package: the loader module and a
    clean copy of the code that scores it, a signature, an input example, pinned requirements."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    from pipeline.modeling.pyfunc import output_columns

    columns, k = output_columns(spec.class_names), len(spec.class_names)
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *spec.input_shape))]),
                               outputs=Schema([ColSpec("double", c) for c in columns[:k]]
                                              + [ColSpec("string", c) for c in columns[k:]]))
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "pipeline"
        shutil.copytree(Path(__file__).resolve().parents[1], code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # A mid-grey image, not a patient's scan, shows the input format.
        yield {"loader_module": "pipeline.modeling.pyfunc", "data_path": str(spec.package), "code_paths": [str(code)],
               "signature": signature, "input_example": np.full((1, *spec.input_shape), 128, dtype=np.uint8),
               "pip_requirements": [_pinned(p) for p in MODEL_REQUIREMENTS]}


def log_model(spec: ModelSpec) -> dict[str, str]:
    """Log the package as a pyfunc model of the active run and register it as a new version,
    tagged (including its class list and input shape, which promote compares)."""
    import mlflow

    with _pyfunc_arguments(spec) as arguments:
        info = mlflow.pyfunc.log_model(name="model", registered_model_name=spec.registered_name, **arguments)
    version = str(info.registered_model_version)
    client = mlflow.tracking.MlflowClient()
    tags = {**spec.version_tags, "classes": json.dumps(spec.class_names),
            "input_shape": "x".join(map(str, spec.input_shape))}
    for key, value in tags.items():
        client.set_model_version_tag(spec.registered_name, version, key, value)
    return {"model_id": info.model_id, "model_uri": info.model_uri, "registered_model": spec.registered_name,
            "model_version": version}


def save_model(spec: ModelSpec, destination: Path) -> Path:
    """The same MLflow Model as a local folder, servable with ``mlflow models serve -m <folder>``."""
    import mlflow

    with _pyfunc_arguments(spec) as arguments:
        mlflow.pyfunc.save_model(str(destination), **arguments)
    return destination


def _pinned(package: str) -> str:
    try:
        return f"{package}=={metadata.version(package)}"
    except metadata.PackageNotFoundError:
        return package


def model_versions(name: str) -> list[dict[str, Any]]:
    """Every registered version of ``name``, newest first: number, tags, aliases and its run's test metrics."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.tracking.MlflowClient(tracking_uri())
    try:
        aliases = client.get_registered_model(name).aliases  # {alias: version}; search results leave them out
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return []
    found = []
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        metrics = client.get_run(v.run_id).data.metrics if v.run_id else {}
        found.append({"version": str(v.version), "tags": dict(v.tags), "run_id": v.run_id,
                      "aliases": [alias for alias, number in aliases.items() if str(number) == str(v.version)],
                      "metrics": {k: m for k, m in metrics.items() if k.startswith("test.")}})
    return found


def set_champion(name: str, version: str) -> None:
    import mlflow

    mlflow.tracking.MlflowClient(tracking_uri()).set_registered_model_alias(name, CHAMPION, version)


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


def run_of_model(reference: str) -> str | None:
    """The run that logged a registered model version: ``models:/name/3``, ``name/3``,
    ``models:/name@alias`` or ``name@alias``; None when ``reference`` is not of that form.
    A form that names no existing version is one :class:`PipelineError`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    found = re.fullmatch(r"(?:models:/)?([^/@]+)(?:/(\d+)|@([\w-]+))", reference)
    if not found or (not reference.startswith("models:/") and found.group(2) is None and found.group(3) is None):
        return None
    name, version, alias = found.groups()
    client = mlflow.tracking.MlflowClient(tracking_uri())
    try:
        entry = (client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, alias))
    except MlflowException as exc:
        raise PipelineError(f"{reference}: no such registered model version in {redact_uri(tracking_uri())} "
                            f"({_first_line(exc)})") from None
    return entry.run_id


def run_exists(run_id: str) -> bool:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.tracking.MlflowClient(tracking_uri()).get_run(run_id)
    except MlflowException:
        return False
    return True


def download_run_files(run_id: str, names: Iterable[str], destination: Path) -> Path:
    """Copies of a run's artifacts (``eval/predictions.csv``, …) under ``destination``, same layout."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.tracking.MlflowClient(tracking_uri())
    for name in names:
        (destination / name).parent.mkdir(parents=True, exist_ok=True)
        try:
            client.download_artifacts(run_id, name, str((destination / name).parent))
        except (MlflowException, OSError) as exc:
            raise PipelineError(f"run {run_id} has no artifact {name} ({_first_line(exc)}): it was not logged by "
                                "this pipeline's track stage") from None
    return destination


def log_comparison(run_ids: Mapping[str, str], name: str, metrics: Mapping[str, float], tags: Mapping[str, str],
                   files: Iterable[Path]) -> str:
    """A comparison of two logged runs as its own run (in the first run's experiment), linked both
    ways: tags ``medcnn.compare.a``/``.b`` name the compared runs, and each of them gets a tag
    ``medcnn.compared_in.<comparison run id>``. Returns the comparison's run id."""
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.tracking.MlflowClient(tracking_uri())
    experiment = client.get_run(run_ids["a"]).info.experiment_id
    run = client.create_run(experiment, run_name=name, tags={
        **tags, **{f"medcnn.compare.{k}": v for k, v in run_ids.items()}, SOURCE_NAME: "python -m pipeline.compare",
        SOURCE_TYPE: "LOCAL"})
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()])
    for path in files:
        client.log_artifact(run_id, str(path))
    for side, compared in run_ids.items():
        client.set_tag(compared, f"medcnn.compared_in.{run_id}", f"{name} (as {side.upper()})")
    client.set_terminated(run_id, "FINISHED")
    return run_id
