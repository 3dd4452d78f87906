"""python -m pipeline.compare: two models paired on the same test images, found as folders, MLflow
runs, registered versions or git revisions; refused when the test images differ."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipeline import compare
from pipeline.core.errors import PipelineError
from pipeline.evaluation import comparison
from tests.conftest import SITE_C, run_stages, tiny_params


@pytest.fixture(scope="module")
def two_models(tiny_run, tmp_path_factory):
    """A: the tiny run. B: another network (one epoch, another seed) on the same prepared data,
    evaluated with a fixed 0.5 threshold and on the same external site, in a workspace of its own."""
    root_a, _ = tiny_run
    root_b = tmp_path_factory.mktemp("model_b")
    shutil.copytree(root_a / "data", root_b / "data")
    shutil.copytree(root_a / "reports" / "data", root_b / "reports" / "data")
    changes = {"train.epochs": 1, "evaluate.threshold": "fixed:0.5", "evaluate.baselines": [],
               "evaluate.corruptions": [], "evaluate.bootstrap": 100, "evaluate.external": [SITE_C]}
    run_stages(root_b, tiny_params(root_b, seed=7, **changes), ("train",))
    # evaluated with A's seed, which also seeds the phantom's external site: the same site images as A's
    run_stages(root_b, tiny_params(root_b, **changes), ("evaluate",))
    return root_a, root_b


def metrics_of(root):
    return json.loads((root / "reports/eval/metrics.json").read_text())["test"]


def test_two_workspaces_compared_paired(two_models, tmp_path, capsys):
    root_a, root_b = two_models
    result = compare.run(str(root_a), str(root_b), tmp_path / "out", n_resamples=200, seed=0)
    a, b = metrics_of(root_a), metrics_of(root_b)
    # DeLong's AUCs are each model's own test ROC AUC, from the 6-decimal probabilities of its
    # predictions file (ties that rounding makes can move the tiny models' AUCs in the 3rd decimal).
    for side, metrics in (("a", a), ("b", b)):
        scored = compare.resolve(str(two_models[side == "b"]))
        exact = roc_auc_score(np.array(scored.labels) == "lesion", scored.probs[:, 1])
        assert result["delong"][f"auc_{side}"] == pytest.approx(exact, abs=1e-6)
        assert exact == pytest.approx(metrics["roc_auc"], abs=0.01)
    assert result["differences"]["accuracy"]["difference"] == pytest.approx(b["accuracy"] - a["accuracy"], abs=1e-6)
    mc = result["mcnemar"]
    assert mc["a_only"] + mc["b_only"] + mc["both"] + mc["neither"] == a["n"] == result["test"]["n"]
    assert (mc["both"] + mc["a_only"]) / a["n"] == pytest.approx(a["accuracy"], abs=1e-6)
    assert result["b"]["threshold"] == 0.5 and result["a"]["threshold"] == a["threshold"]
    assert result["bootstrap"] == {"resamples": 200, "seed": 0, "unit": "image"}
    page = (tmp_path / "out" / "comparison.html").read_text()
    assert json.loads((tmp_path / "out" / "comparison.json").read_text())["delong"] == result["delong"]
    assert f"Both models were scored on the same {a['n']} test images" in page
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")
    printed = capsys.readouterr().out
    assert printed.splitlines()[-1].startswith(f"compared {root_b} with {root_a} on {a['n']} test images")
    # Swapping A and B negates every difference.
    swapped = compare.run(str(root_b), str(root_a), tmp_path / "swapped", n_resamples=200, seed=0)
    assert swapped["delong"]["difference"] == pytest.approx(-result["delong"]["difference"])
    assert (swapped["mcnemar"]["a_only"], swapped["mcnemar"]["b_only"]) == (mc["b_only"], mc["a_only"])


def edited_copy(root, tmp_path, edit):
    copy = shutil.copytree(root / "reports", tmp_path / "edited" / "reports")
    edit(copy)
    return copy.parent


def test_refused_unless_the_same_test_images(two_models, tmp_path):
    root_a, root_b = two_models

    def other_images(reports):
        summary = json.loads((reports / "data/summary.json").read_text())
        summary["outputs_sha256"]["test/images.npy"] = "0" * 64
        (reports / "data/summary.json").write_text(json.dumps(summary))

    with pytest.raises(PipelineError, match=r"not scored on the same test images: the sha256 of test/images.npy"):
        compare.run(str(root_a), str(edited_copy(root_b, tmp_path, other_images)), tmp_path / "x", 10)
    assert not (tmp_path / "x").exists()  # nothing written

    def other_ids(reports):
        path = reports / "eval/predictions.csv"
        path.write_text(path.read_text().replace("phantom-test-00000", "someone-else"))

    with pytest.raises(PipelineError, match="list different test image ids"):
        compare.run(str(root_a), str(edited_copy(root_b, tmp_path / "2", other_ids)), tmp_path / "x", 10)
    with pytest.raises(PipelineError, match="not a folder, a registered model version, a run in"):
        compare.run(str(root_a), "no-such-thing", tmp_path / "x", 10)


def test_a_multilabel_run_is_refused_by_name(tmp_path, two_models):
    def findings(reports):
        path = reports / "eval/metrics.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "task": "multilabel"}))

    with pytest.raises(PipelineError, match="a multilabel model"):
        compare.run(str(two_models[0]), str(edited_copy(two_models[1], tmp_path, findings)), tmp_path / "x", 10)


def test_runs_and_registered_versions_from_mlflow_linked_both_ways(two_models, mlflow_store, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{mlflow_store}/mlflow.db")
    experiment = client.create_experiment("medcnn", artifact_location=(mlflow_store / "mlartifacts").as_uri())
    runs = []
    for root in two_models:  # the artifacts track logs: eval/ and data/ of reports/
        run = client.create_run(experiment)
        client.log_artifacts(run.info.run_id, str(root / "reports/eval"), "eval")
        client.log_artifacts(run.info.run_id, str(root / "reports/data"), "data")
        client.set_terminated(run.info.run_id)
        runs.append(run.info.run_id)
    client.create_registered_model("medcnn")
    client.create_model_version("medcnn", (mlflow_store / "mlartifacts" / "model").as_uri(), run_id=runs[1])
    client.set_registered_model_alias("medcnn", "champion", "1")
    by_version = compare.run(runs[0], "medcnn@champion", tmp_path / "v", n_resamples=50, seed=0)
    by_run = compare.run(runs[0], runs[1], tmp_path / "r", n_resamples=50, seed=0)
    by_folder = compare.run(str(two_models[0]), str(two_models[1]), tmp_path / "f", n_resamples=50, seed=0, log=False)
    for found in (by_version, by_run):
        assert found["delong"] == by_folder["delong"] and found["differences"] == by_folder["differences"]
        logged = client.get_run(found["mlflow_run_id"])
        assert logged.data.tags["medcnn.compare.a"] == runs[0] and logged.data.tags["medcnn.compare.b"] == runs[1]
        assert logged.data.metrics["delong.p_value"] == pytest.approx(found["delong"]["p_value"])
        assert {a.path for a in client.list_artifacts(found["mlflow_run_id"])} == {"comparison.html",
                                                                                   "comparison.json"}
        for side, run_id in (("A", runs[0]), ("B", runs[1])):
            assert client.get_run(run_id).data.tags[f"medcnn.compared_in.{found['mlflow_run_id']}"].endswith(
                f"(as {side})")
    assert "mlflow_run_id" not in by_folder  # folders without a recorded run are not logged
    with pytest.raises(PipelineError, match="medcnn/9: no such registered model version"):
        compare.run(runs[0], "medcnn/9", tmp_path / "x", 10)


def test_a_git_revision_of_a_dvc_repository(two_models, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(two_models[1] / "reports", repo / "reports")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "model B"], check=True)
    (repo / "reports/eval/predictions.csv").unlink()  # the revision is read, not the working tree
    result = compare.run(str(two_models[0]), "HEAD", tmp_path / "g", n_resamples=20, seed=0, repo=repo)
    assert result["b"]["origin"] == "DVC experiment / git revision HEAD"
    assert result["delong"]["auc_b"] == compare.run(str(two_models[0]), str(two_models[1]), tmp_path / "f", 20,
                                                    log=False)["delong"]["auc_b"]


def test_patients_are_resampled_whole_when_the_predictions_name_them(two_models, tmp_path):
    def with_patients(reports):
        path = reports / "eval/predictions.csv"
        lines = path.read_text().splitlines()
        rows = [lines[0].replace("id,", "id,patient,", 1)] + [
            line.replace(",", f",p{n // 2},", 1) for n, line in enumerate(lines[1:])]
        path.write_text("\n".join(rows) + "\n")

    a = edited_copy(two_models[0], tmp_path, with_patients)
    result = compare.run(str(a), str(two_models[1]), tmp_path / "p", n_resamples=50, seed=0)
    assert result["bootstrap"]["unit"] == "patient" and result["test"]["patients"] == result["test"]["n"] // 2
    scored = compare.resolve(str(a))
    assert scored.patients[:4] == ["p0", "p0", "p1", "p1"]
    labels = np.array([scored.class_names.index(y) for y in scored.labels])
    direct = comparison.paired_bootstrap(labels, scored.probs, compare.resolve(str(two_models[1])).probs,
                                         scored.threshold, 0.5, scored.positive, 50, 0, np.array(scored.patients))
    assert direct == result["differences"]


def test_two_models_compared_on_an_external_site(two_models, tmp_path, capsys):
    root_a, root_b = two_models
    result = compare.run(str(root_a), str(root_b), tmp_path / "site", n_resamples=100, seed=0, site="site_c")
    site_a = json.loads((root_a / "reports/eval/metrics.json").read_text())["external"]["sites"]["site_c"]
    assert result["test"]["n"] == site_a["n"] and result["test"]["sha256"] == {"external site site_c": site_a["sha256"]}
    # A's AUC is its ROC AUC at the site, from the site's predictions file, not the test split's
    scored = compare.resolve(str(root_a), site="site_c")
    assert len(scored.ids) == site_a["n"] and scored.ids[0].startswith("site_c-")
    assert result["delong"]["auc_a"] == pytest.approx(site_a["test"]["roc_auc"], abs=0.01)
    page = (tmp_path / "site" / "comparison.html").read_text()
    assert f"Both models were scored on the same {site_a['n']} images of external site site_c" in page
    assert "eval/external/site_c.csv" in page
    assert capsys.readouterr().out.splitlines()[-1].endswith(f"images of external site site_c: {tmp_path}/site/"
                                                             "comparison.html")
    with pytest.raises(PipelineError, match=r"no external site 'site_d' in eval/metrics.json \(its sites: site_c\)"):
        compare.run(str(root_a), str(root_b), tmp_path / "none", site="site_d")
    assert not (tmp_path / "none").exists()
