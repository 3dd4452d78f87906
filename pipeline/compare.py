"""Compare two models on the same test images: ``python -m pipeline.compare A B``.

Is model B really better than model A (the one in use, or the one it would replace)? Each of A
and B names one pipeline execution by any of:

- an MLflow run id (the ``run_id`` of ``reports/mlflow_run.json``);
- a registered model version: ``models:/medcnn/3``, ``medcnn/3``, ``medcnn@champion``;
- a DVC experiment name (``dvc exp show``) or any git revision of this repository, read with
  ``dvc.api.read`` (the experiment's own files, from git and the DVC cache);
- a folder: a workspace (its ``reports/``) or a copy of a run's artifacts.

What is read of each: the test predictions (``eval/predictions.csv``), the evaluation's metrics
(the task, the frozen threshold) and the data summary (the sha256 of the prepared test arrays).
The comparison is refused unless both scored the same test images: the same ids, labels and
test-array checksums. Then, paired image by image (:mod:`pipeline.evaluation.comparison`):
DeLong's test of the ROC AUC difference, McNemar's test of the decisions at each model's own
operating point, and paired-bootstrap intervals of the difference B − A of every headline
metric and of net benefit (whole patients resampled where the predictions name them).

Writes ``comparison.html`` (one self-contained page in the report's style) and
``comparison.json`` to ``--out`` (default ``reports/compare/<A>_vs_<B>``); when both are MLflow
runs, the comparison is also logged as a run of A's experiment, linked to both (``--no-log``
skips it).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import re
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core import paths
from pipeline.core.errors import PipelineError
from pipeline.core.files import fmt, write_json, write_text
from pipeline.core.runtime import configure_logging, run_command
from pipeline.evaluation import comparison
from pipeline.evaluation.metrics import HEADLINE
from pipeline.reporting import mlflow_adapter, paired

# What a comparison reads of an execution, relative to its reports/ folder (the same layout as
# the artifacts its track stage logs).
FILES = {"predictions": f"eval/{paths.PREDICTIONS}", "metrics": f"eval/{paths.METRICS}",
         "summary": "data/summary.json"}
TEST_ARRAYS = ("test/images.npy", "test/labels.npy")
RUN_ID = re.compile(r"[0-9a-f]{32}")


@dataclasses.dataclass
class Scored:
    """One execution's test predictions and what identifies them."""

    reference: str  # as the user named it
    origin: str  # how it was found: MLflow run, registered version, DVC experiment, folder
    run_id: str | None  # its MLflow run, when it has one in this store
    ids: list[str]
    patients: list[str] | None
    labels: list[str]
    class_names: list[str]
    probs: np.ndarray  # calibrated, as the model package scores
    predictions: list[str]
    threshold: float | None
    threshold_rule: str
    positive: int  # the class the threshold decides (binary tasks)
    test_sha256: dict[str, str]


def parse(reference: str, origin: str, run_id: str | None, texts: dict[str, str]) -> Scored:
    """A :class:`Scored` from the three files' texts; one clear error for a file that is not the pipeline's."""
    metrics, summary = json.loads(texts["metrics"]), json.loads(texts["summary"])
    if "task" in metrics:
        raise PipelineError(f"{reference}: a {metrics['task']} model (several outputs per image); the paired "
                            "comparison covers one class per image (binary or multi-class)")
    rows = list(csv.DictReader(io.StringIO(texts["predictions"])))
    names = summary["class_names"]
    columns = [f"prob_{n}" for n in names]
    if not rows or any(c not in rows[0] for c in ("id", "label", "prediction", *columns)):
        raise PipelineError(f"{reference}: {FILES['predictions']} lacks the columns id, label, prediction, "
                            f"{', '.join(columns)}")
    missing = [k for k in TEST_ARRAYS if k not in summary.get("outputs_sha256", {})]
    if missing:
        raise PipelineError(f"{reference}: {FILES['summary']} has no sha256 of {', '.join(missing)}: its test images "
                            "cannot be checked")
    test = metrics["test"]
    if test["threshold"] is not None and test.get("positive_class") not in names:
        raise PipelineError(f"{reference}: {FILES['metrics']} does not name the positive class its threshold decides "
                            "(evaluated by an older medcnn: rerun its evaluate stage)")
    return Scored(reference, origin, run_id, [r["id"] for r in rows],
                  [r["patient"] for r in rows] if "patient" in rows[0] else None, [r["label"] for r in rows], names,
                  np.array([[float(r[c]) for c in columns] for r in rows]), [r["prediction"] for r in rows],
                  test["threshold"], test["threshold_rule"],
                  names.index(test["positive_class"]) if test["threshold"] is not None else 1,
                  {k: summary["outputs_sha256"][k] for k in TEST_ARRAYS})


def from_folder(reference: str, folder: Path, origin: str, run_id: str | None = None) -> Scored:
    texts = {}
    for key, name in FILES.items():
        if not (folder / name).is_file():
            raise PipelineError(f"{reference}: {folder / name} not found (is it a pipeline workspace that has run "
                                "evaluate?)")
        texts[key] = (folder / name).read_text()
    return parse(reference, origin, run_id, texts)


def from_run(reference: str, run_id: str, origin: str) -> Scored:
    with tempfile.TemporaryDirectory(prefix="medcnn-compare-") as tmp:
        folder = mlflow_adapter.download_run_files(run_id, FILES.values(), Path(tmp))
        return from_folder(reference, folder, origin, run_id)


def git_revision(reference: str, repo: Path) -> str | None:
    """The git ref of a DVC experiment named ``reference``, else ``reference`` if git knows it as a commit."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=repo, capture_output=True,
                          text=True).stdout.split()
    named = [r for r in refs if r.rsplit("/", 1)[-1] == reference]
    if named:
        return named[0]
    known = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{reference}^{{commit}}"], cwd=repo,
                           capture_output=True, text=True)
    return reference if known.returncode == 0 else None


def from_revision(reference: str, revision: str, repo: Path) -> Scored:
    import dvc.api

    texts = {}
    for key, name in FILES.items():
        try:
            texts[key] = dvc.api.read(str(paths.REPORTS / name), repo=str(repo), rev=revision)
        except Exception as exc:  # dvc raises its own and git's errors; each means the file is not there
            raise PipelineError(f"{reference}: {paths.REPORTS / name} cannot be read at {revision} "
                                f"({type(exc).__name__}); was evaluate run in that experiment, and is its cache "
                                "here (dvc pull)?") from None
    run_id = None
    try:
        recorded = json.loads(dvc.api.read(str(paths.MLFLOW_RUN), repo=str(repo), rev=revision))["run_id"]
        run_id = recorded if mlflow_adapter.run_exists(recorded) else None
    except Exception:  # not tracked in that revision: the comparison is not linked to a run
        pass
    return parse(reference, f"DVC experiment / git revision {revision}", run_id, texts)


def resolve(reference: str, repo: Path = Path(".")) -> Scored:
    """Find what ``reference`` names: a folder, a registered model version, an MLflow run id, a
    DVC experiment or git revision, in that order."""
    folder = Path(reference)
    if folder.is_dir():
        reports = folder / paths.REPORTS if (folder / paths.REPORTS / FILES["metrics"]).is_file() else folder
        recorded = folder / paths.MLFLOW_RUN
        run_id = json.loads(recorded.read_text())["run_id"] if recorded.is_file() else None
        return from_folder(reference, reports, f"folder {reports}",
                           run_id if run_id and mlflow_adapter.run_exists(run_id) else None)
    run_id = mlflow_adapter.run_of_model(reference)
    if run_id:
        return from_run(reference, run_id, f"registered model version (run {run_id})")
    if RUN_ID.fullmatch(reference) and mlflow_adapter.run_exists(reference):
        return from_run(reference, reference, "MLflow run")
    revision = git_revision(reference, repo)
    if revision:
        return from_revision(reference, revision, repo)
    raise PipelineError(f"{reference}: not a folder, a registered model version, a run in "
                        f"{mlflow_adapter.redact_uri(mlflow_adapter.tracking_uri())}, a DVC experiment or a git revision")


def aligned(a: Scored, b: Scored) -> list[int]:
    """B's rows in A's order; refuses unless both scored the same test images."""
    if a.test_sha256 != b.test_sha256:
        differ = [k for k in TEST_ARRAYS if a.test_sha256[k] != b.test_sha256[k]]
        raise PipelineError(f"{a.reference} and {b.reference} were not scored on the same test images: the sha256 of "
                            f"{', '.join(differ)} differ ({a.test_sha256[differ[0]][:12]}… against "
                            f"{b.test_sha256[differ[0]][:12]}…). A paired comparison needs the same test split")
    if a.class_names != b.class_names:
        raise PipelineError(f"{a.reference} and {b.reference} have different classes ({a.class_names} against "
                            f"{b.class_names})")
    where = {i: n for n, i in enumerate(b.ids)}
    if len(where) != len(b.ids) or sorted(where) != sorted(a.ids) or len(a.ids) != len(b.ids):
        raise PipelineError(f"{a.reference} and {b.reference} list different test image ids (the same arrays with "
                            "another pseudonym salt?): the images cannot be paired")
    order = [where[i] for i in a.ids]
    if [b.labels[n] for n in order] != a.labels:
        raise PipelineError(f"{a.reference} and {b.reference} disagree on the labels of the same test images")
    return order


def compare(a: Scored, b: Scored, n_resamples: int, seed: int) -> dict[str, Any]:
    order = aligned(a, b)
    positive = a.positive
    if b.threshold is not None and a.threshold is not None and b.positive != positive:
        raise PipelineError(f"{a.reference} and {b.reference} decide for different positive classes "
                            f"({a.class_names[a.positive]} against {b.class_names[b.positive]})")
    labels = np.array([a.class_names.index(y) for y in a.labels])
    probs_b = b.probs[order]
    groups = np.array(a.patients) if a.patients else None
    result = comparison.compare(labels, a.probs, probs_b, a.threshold, b.threshold, positive, n_resamples, seed,
                                groups)
    return {"a": describe(a), "b": describe(b), "positive_class": a.class_names[positive],
            "test": {"n": len(labels), "sha256": a.test_sha256, "patients": len(set(a.patients)) if a.patients else None},
            "bootstrap": {"resamples": n_resamples, "seed": seed, "unit": "patient" if groups is not None else "image"},
            **result}


def describe(scored: Scored) -> dict[str, Any]:
    return {"reference": scored.reference, "origin": scored.origin, "run_id": scored.run_id,
            "threshold": scored.threshold, "threshold_rule": scored.threshold_rule}


def page(result: dict[str, Any]) -> str:
    """The comparison as one self-contained HTML page, every sentence from ``result``."""
    from pipeline.report import render

    a, b = result["a"]["reference"], result["b"]["reference"]
    keys = [k for k in (*paired.TABLE_METRICS, *HEADLINE) if k in result["differences"]]
    rows = [[k.replace("_", " "), result["differences"][k]["difference"], paired.interval(result["differences"][k])]
            for k in dict.fromkeys(keys)]
    test = result["test"]
    unit = (f"{test['patients']} patients resampled whole" if test["patients"] else "images resampled")
    context = {
        "title": f"Paired comparison: {b} (B) against {a} (A)",
        "models": [[side.upper(), m["reference"], m["origin"], m["run_id"] or "none",
                    "arg-max" if m["threshold"] is None else f"{fmt(m['threshold'])} ({m['threshold_rule']})"]
                   for side, m in (("a", result["a"]), ("b", result["b"]))],
        "same": (f"Both models were scored on the same {test['n']} test images: the same ids and labels, and the same "
                 f"prepared test arrays (sha256 {test['sha256']['test/images.npy'][:16]}… of the images, "
                 f"{test['sha256']['test/labels.npy'][:16]}… of the labels)."),
        "sentences": paired.sentences(result, f"A ({a})", f"B ({b})"),
        "rows": rows,
        "method": " ".join([
            "Differences are B − A, each model deciding at its own frozen operating point, from the probabilities "
            f"of each run's {FILES['predictions']}.",
            *([f"Net benefit is valued at threshold probability {fmt(result['a']['threshold'])} (A's threshold), "
               f"positive class {result['positive_class']}."] if "net_benefit" in result["differences"] else []),
            f"95% intervals: paired percentile bootstrap, {result['bootstrap']['resamples']} resamples (seed "
            f"{result['bootstrap']['seed']}, {unit}), each resample scoring both models."]),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    return render("compare.html.j2", context)


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The comparison's numbers as MLflow metrics: ``difference.<metric>`` (with ``_ci_low``/``_ci_high``),
    ``delong.*`` and ``mcnemar.*``."""
    out = {}
    for key, row in result["differences"].items():
        for part, value in (("", row["difference"]), ("_ci_low", row["ci_low"]), ("_ci_high", row["ci_high"])):
            if value is not None:
                out[f"difference.{key}{part}"] = value
    for test in ("delong", "mcnemar"):
        out.update({f"{test}.{k}": v for k, v in result.get(test, {}).items() if isinstance(v, (int, float))})
    return out


def safe(reference: str) -> str:
    return re.sub(r"[^\w.@-]+", "_", reference).strip("_")[:60]


def run(reference_a: str, reference_b: str, out: Path | None = None, n_resamples: int = 1000, seed: int = 42,
        log: bool = True, repo: Path = Path(".")) -> dict[str, Any]:
    a, b = resolve(reference_a, repo), resolve(reference_b, repo)
    result = compare(a, b, n_resamples, seed)
    out = out or paths.REPORTS / "compare" / f"{safe(reference_a)}_vs_{safe(reference_b)}"
    html = page(result)
    if log and a.run_id and b.run_id:
        with tempfile.TemporaryDirectory(prefix="medcnn-compare-") as tmp:
            files = [Path(tmp) / "comparison.html", Path(tmp) / "comparison.json"]
            files[0].write_text(html)
            files[1].write_text(json.dumps(result, indent=2, sort_keys=True))
            result["mlflow_run_id"] = mlflow_adapter.log_comparison(
                {"a": a.run_id, "b": b.run_id}, f"compare {safe(reference_b)} vs {safe(reference_a)}",
                flat_metrics(result), {"medcnn.kind": "comparison"}, files)
    write_text(out / "comparison.html", html)
    write_json(out / "comparison.json", result)
    print("\n".join(paired.sentences(result, f"A ({reference_a})", f"B ({reference_b})")))
    print(f"compared {reference_b} with {reference_a} on {result['test']['n']} test images: {out / 'comparison.html'}"
          + (f", MLflow run {result['mlflow_run_id']}" if "mlflow_run_id" in result else ""))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="the reference model A: MLflow run id, models:/name/N, name@alias, DVC experiment, "
                                  "git revision or folder")
    parser.add_argument("b", help="the model B compared with it (the same forms)")
    parser.add_argument("--out", type=Path, help="folder for comparison.html and .json "
                                                 "(default reports/compare/<A>_vs_<B>)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the resamples (default 42)")
    parser.add_argument("--no-log", action="store_true", help="do not log the comparison to MLflow")
    args = parser.parse_args()
    configure_logging()
    run_command(lambda: run(args.a, args.b, args.out, args.bootstrap, args.seed, not args.no_log) and None)


if __name__ == "__main__":
    main()
