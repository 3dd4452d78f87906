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
With ``--site NAME`` the images are an external validation site's instead (``evaluate.external``:
``eval/external/NAME.csv``, and the sha256 evaluate recorded of the site's prepared arrays): is
B better than A where neither was developed? The comparison is refused unless both scored the
same images: the same ids, labels and array checksums. Then, paired image by image (:mod:`pipeline.evaluation.comparison`):
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


def files(site: str | None) -> dict[str, str]:
    """What is read: the test split's predictions, or an external site's."""
    return FILES if site is None else {**FILES, "predictions": f"eval/{paths.EXTERNAL}/{site}.csv"}

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
    sha256: dict[str, str]  # of the scored images' prepared arrays
    images: str = "test images"  # what was scored: the test split, or an external site


def parse(reference: str, origin: str, run_id: str | None, texts: dict[str, str], site: str | None = None) -> Scored:
    """A :class:`Scored` from the three files' texts; one clear error for a file that is not the pipeline's."""
    metrics, summary = json.loads(texts["metrics"]), json.loads(texts["summary"])
    if "task" in metrics:
        raise PipelineError(f"{reference}: a {metrics['task']} model (several outputs per image); the paired "
                            "comparison covers one class per image (binary or multi-class)")
    sites = metrics.get("external", {}).get("sites", {})
    if site is not None and site not in sites:
        raise PipelineError(f"{reference}: no external site '{site}' in {FILES['metrics']} (its sites: "
                            f"{', '.join(sites) or 'none'})")
    rows = list(csv.DictReader(io.StringIO(texts["predictions"])))
    names = summary["class_names"]
    columns = [f"prob_{n}" for n in names]
    if not rows or any(c not in rows[0] for c in ("id", "label", "prediction", *columns)):
        raise PipelineError(f"{reference}: {files(site)['predictions']} lacks the columns id, label, prediction, "
                            f"{', '.join(columns)}")
    missing = [k for k in TEST_ARRAYS if k not in summary.get("outputs_sha256", {})]
    if missing and site is None:
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
                  {k: summary["outputs_sha256"][k] for k in TEST_ARRAYS} if site is None
                  else {f"external site {site}": sites[site]["sha256"]},
                  "test images" if site is None else f"images of external site {site}")


def from_folder(reference: str, folder: Path, origin: str, run_id: str | None = None,
                site: str | None = None) -> Scored:
    texts = {}
    for key, name in sorted(files(site).items(), key=lambda item: item[0] == "predictions"):  # metrics first
        if not (folder / name).is_file():
            if key == "predictions" and site is not None:  # which sites there are: the metrics say
                parse(reference, origin, run_id, {**texts, "predictions": ""}, site)
            raise PipelineError(f"{reference}: {folder / name} not found (is it a pipeline workspace that has run "
                                "evaluate?)")
        texts[key] = (folder / name).read_text()
    return parse(reference, origin, run_id, texts, site)


def from_run(reference: str, run_id: str, origin: str, site: str | None = None) -> Scored:
    with tempfile.TemporaryDirectory(prefix="medcnn-compare-") as tmp:
        folder = mlflow_adapter.download_run_files(run_id, files(site).values(), Path(tmp))
        return from_folder(reference, folder, origin, run_id, site)


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


def from_revision(reference: str, revision: str, repo: Path, site: str | None = None) -> Scored:
    import dvc.api

    texts = {}
    for key, name in files(site).items():
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
    return parse(reference, f"DVC experiment / git revision {revision}", run_id, texts, site)


def resolve(reference: str, repo: Path = Path("."), site: str | None = None) -> Scored:
    """Find what ``reference`` names: a folder, a registered model version, an MLflow run id, a
    DVC experiment or git revision, in that order; its test predictions, or ``site``'s."""
    folder = Path(reference)
    if folder.is_dir():
        reports = folder / paths.REPORTS if (folder / paths.REPORTS / FILES["metrics"]).is_file() else folder
        recorded = folder / paths.MLFLOW_RUN
        run_id = json.loads(recorded.read_text())["run_id"] if recorded.is_file() else None
        return from_folder(reference, reports, f"folder {reports}",
                           run_id if run_id and mlflow_adapter.run_exists(run_id) else None, site)
    run_id = mlflow_adapter.run_of_model(reference)
    if run_id:
        return from_run(reference, run_id, f"registered model version (run {run_id})", site)
    if RUN_ID.fullmatch(reference) and mlflow_adapter.run_exists(reference):
        return from_run(reference, reference, "MLflow run", site)
    revision = git_revision(reference, repo)
    if revision:
        return from_revision(reference, revision, repo, site)
    raise PipelineError(f"{reference}: not a folder, a registered model version, a run in "
                        f"{mlflow_adapter.redact_uri(mlflow_adapter.tracking_uri())}, a DVC experiment or a git revision")


def aligned(a: Scored, b: Scored) -> list[int]:
    """B's rows in A's order; refuses unless both scored the same images."""
    if a.sha256 != b.sha256:
        differ = [k for k in a.sha256 if a.sha256[k] != b.sha256.get(k)]
        raise PipelineError(f"{a.reference} and {b.reference} were not scored on the same {a.images}: the sha256 of "
                            f"{', '.join(differ)} differ ({a.sha256[differ[0]][:12]}… against "
                            f"{str(b.sha256.get(differ[0]))[:12]}…). A paired comparison needs the same images")
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
            "test": {"n": len(labels), "images": a.images, "sha256": a.sha256,
                     "patients": len(set(a.patients)) if a.patients else None},
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
        "same": (f"Both models were scored on the same {test['n']} {test['images']}: the same ids and labels, and the "
                 "same prepared arrays (sha256 " + ", ".join(f"{sha[:16]}… of the {what}" for what, sha in
                                                            test["sha256"].items()) + ")."),
        "sentences": paired.sentences(result, f"A ({a})", f"B ({b})"),
        "rows": rows,
        "method": " ".join([
            "Differences are B − A, each model deciding at its own frozen operating point, from the probabilities "
            f"of each run's {result['predictions']}.",
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
        log: bool = True, repo: Path = Path("."), site: str | None = None) -> dict[str, Any]:
    a, b = resolve(reference_a, repo, site), resolve(reference_b, repo, site)
    result = {**compare(a, b, n_resamples, seed), "predictions": files(site)["predictions"]}
    where = "" if site is None else f"_at_{safe(site)}"
    out = out or paths.REPORTS / "compare" / f"{safe(reference_a)}_vs_{safe(reference_b)}{where}"
    html = page(result)
    if log and a.run_id and b.run_id:
        with tempfile.TemporaryDirectory(prefix="medcnn-compare-") as tmp:
            logged = [Path(tmp) / "comparison.html", Path(tmp) / "comparison.json"]
            logged[0].write_text(html)
            logged[1].write_text(json.dumps(result, indent=2, sort_keys=True))
            result["mlflow_run_id"] = mlflow_adapter.log_comparison(
                {"a": a.run_id, "b": b.run_id}, f"compare {safe(reference_b)} vs {safe(reference_a)}"
                + (f" at {site}" if site else ""), flat_metrics(result),
                {"medcnn.kind": "comparison", "medcnn.compare.images": a.images}, logged)
    write_text(out / "comparison.html", html)
    write_json(out / "comparison.json", result)
    print("\n".join(paired.sentences(result, f"A ({reference_a})", f"B ({reference_b})")))
    print(f"compared {reference_b} with {reference_a} on {result['test']['n']} {a.images}: {out / 'comparison.html'}"
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
    parser.add_argument("--site", help="compare on this external validation site's images (evaluate.external) "
                                       "instead of the test split")
    args = parser.parse_args()
    configure_logging()
    run_command(lambda: run(args.a, args.b, args.out, args.bootstrap, args.seed, not args.no_log,
                            site=args.site) and None)


if __name__ == "__main__":
    main()
