"""Multi-label findings and ordinal grades: the task objects' losses, decisions and metrics
against scikit-learn, partial labels, and both task types from a MedMNIST-layout file and the
phantom through prepare, balance, train, evaluate and predict."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, cohen_kappa_score, roc_auc_score

from pipeline import export, tasks
from pipeline.core.config import load_params
from pipeline.core.errors import PipelineError
from pipeline.data import phantom
from pipeline.modeling.package import load_package
from pipeline.modeling.recipe import CornLoss
from pipeline.tasks.multilabel import MaskedBCE
from pipeline.tasks.ordinal import median_grade, quadratic_kappa
from tests.conftest import SITE_C, make_npz, run_stages, tiny_params, write_params

FINDINGS = ["a", "b", "c"]


def random_multilabel(n: int = 300, seed: int = 0, unknown: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.uniform(size=(n, 3)) < [0.3, 0.2, 0.5]).astype(np.int64)
    probs = np.clip(0.35 * labels + rng.uniform(size=(n, 3)) * 0.65, 0, 1)
    labels[rng.uniform(size=(n, 3)) < unknown] = -1
    return labels, probs


def test_multilabel_metrics_match_scikit_learn():
    labels, probs = random_multilabel()
    task = tasks.for_data("multilabel", FINDINGS)
    metrics = task.metrics(labels, probs, [0.5, 0.5, 0.5])
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(labels, probs, average="macro"), abs=1e-12)
    assert metrics["roc_auc_micro"] == pytest.approx(roc_auc_score(labels, probs, average="micro"), abs=1e-12)
    for c, name in enumerate(FINDINGS):
        assert metrics[name, "average_precision"] == pytest.approx(average_precision_score(labels[:, c], probs[:, c]))
        decided = probs[:, c] >= 0.5
        assert metrics[name, "sensitivity"] == pytest.approx(decided[labels[:, c] == 1].mean())
        assert metrics[name, "specificity"] == pytest.approx((~decided)[labels[:, c] == 0].mean())
    # MedMNIST's ACC: the mean over findings of the accuracy at 0.5
    assert metrics["accuracy"] == pytest.approx(((probs > 0.5) == labels).mean(axis=0).mean())


def test_partial_labels_are_left_out_of_every_metric_and_of_the_loss():
    labels, probs = random_multilabel(unknown=0.2)
    assert (labels == -1).sum() > 100
    task = tasks.for_data("multilabel", FINDINGS)
    metrics = task.metrics(labels, probs, [0.5, 0.5, 0.5])
    for c, name in enumerate(FINDINGS):
        known = labels[:, c] != -1
        assert metrics[name, "n"] == known.sum()
        assert metrics[name, "roc_auc"] == pytest.approx(roc_auc_score(labels[known, c], probs[known, c]))
    # an unknown entry's logit gets no gradient and does not move the loss
    logits = torch.randn(len(labels), 3, dtype=torch.float64, requires_grad=True)
    loss = MaskedBCE(torch.tensor([2.0, 3.0, 1.0], dtype=torch.float64))(logits, torch.from_numpy(labels))
    loss.sum().backward()
    assert torch.all(logits.grad[torch.from_numpy(labels == -1)] == 0)
    assert torch.all(logits.grad[torch.from_numpy(labels != -1)] != 0)
    changed = logits.detach().clone()
    changed[torch.from_numpy(labels == -1)] = 50.0
    again = MaskedBCE(torch.tensor([2.0, 3.0, 1.0], dtype=torch.float64))(changed, torch.from_numpy(labels))
    assert torch.allclose(again, loss.detach())


def test_multilabel_chance_loss_is_ln2_and_thresholds_are_per_finding():
    task = tasks.for_data("multilabel", FINDINGS)
    cfg = tiny_params(Path.cwd()).train
    assert task.chance_loss(cfg) == pytest.approx(np.log(2), abs=1e-6)
    labels, probs = random_multilabel(seed=1)
    uniform = np.full_like(probs, 0.5)
    assert task.validation_loss(labels, uniform, [4.0, 2.5, 1.0]) == pytest.approx(np.log(2))
    chosen = task.thresholds("youden", labels, probs, 1)
    assert len(chosen) == 3 and len(set(chosen)) == 3
    assert task.thresholds("fixed:0.3", labels, probs, 1) == [0.3, 0.3, 0.3]
    assert np.array_equal(task.decide(probs, chosen, 1), (probs >= chosen).astype(int))
    assert task.describe(np.array([1, 0, 1])) == "a|c" and task.describe(np.array([0, 0, 0])) == "none"


def test_ordinal_kappa_matches_scikit_learn_and_corn_probabilities_are_a_distribution():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, 400)
    grades = np.clip(labels + rng.integers(-1, 2, 400), 0, 4)
    assert quadratic_kappa(labels, grades, 5) == pytest.approx(cohen_kappa_score(labels, grades, weights="quadratic"))
    task = tasks.for_data("ordinal", [f"g{k}" for k in range(5)])
    probs = task.probabilities(torch.randn(50, 4)).numpy()  # CORN: K-1 outputs
    assert probs.shape == (50, 5) and probs.min() >= 0 and np.allclose(probs.sum(1), 1)
    assert np.array_equal(median_grade(np.array([[0.4, 0.05, 0.55], [0.6, 0.3, 0.1], [0.2, 0.3, 0.5]])), [2, 0, 1])
    # the CORN loss of grade g trains output k on images with grade >= k, target grade > k
    logits = torch.tensor([[0.3, -0.2, 1.0, 0.5]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = (bce(logits[0, 0], torch.tensor(1.0)) + bce(logits[0, 1], torch.tensor(1.0))
                + bce(logits[0, 2], torch.tensor(0.0))) / 4
    assert CornLoss(torch.ones(5))(logits, torch.tensor([2]))[0] == pytest.approx(float(expected))
    metrics = task.metrics(labels, np.eye(5)[grades], None)
    assert metrics["mae"] == pytest.approx(np.abs(grades - labels).mean())
    assert metrics["within_one"] == 1.0 and metrics["accuracy"] == pytest.approx((grades == labels).mean())


def test_the_task_comes_from_the_data_and_a_wrong_one_is_refused(tmp_path):
    matrix = np.array([[1, 0], [0, 1], [1, 1], [0, 0]] * 10)
    path = make_npz(tmp_path / "multi.npz", **{f"{s}_labels": matrix[:n] for s, n in
                                               (("train", 40), ("val", 12), ("test", 16))})
    run_stages(tmp_path, load_params(write_params(tmp_path / "p.yaml", {"data.source": "npz", "data.path": str(path)})),
               ("prepare",))
    assert json.loads((tmp_path / "data/prepared/meta.json").read_text())["task"] == "multilabel"
    with pytest.raises(PipelineError, match="one column per finding .* data.task is binary"):
        run_stages(tmp_path, load_params(write_params(tmp_path / "q.yaml", {
            "data.source": "npz", "data.path": str(path), "data.task": "binary"})), ("prepare",))
    with pytest.raises(PipelineError, match="balance.strategy=smote cannot balance multi-label data"):
        run_stages(tmp_path, load_params(write_params(tmp_path / "r.yaml", {
            "data.source": "npz", "data.path": str(path), "balance.strategy": "smote"})), ("prepare", "balance"))
    mixed = make_npz(tmp_path / "mixed.npz", train_labels=matrix)
    with pytest.raises(PipelineError, match="different numbers of label columns .*one label per image"):
        run_stages(tmp_path, load_params(write_params(tmp_path / "m.yaml", {"data.source": "npz",
                                                                             "data.path": str(mixed)})), ("prepare",))
    bad = make_npz(tmp_path / "bad.npz", **{f"{s}_labels": np.full((n, 2), 2) for s, n in
                                            (("train", 40), ("val", 12), ("test", 16))})
    with pytest.raises(PipelineError, match="must be 1 \\(present\\), 0 \\(absent\\) or -1"):
        run_stages(tmp_path, load_params(write_params(tmp_path / "s.yaml", {"data.source": "npz", "data.path": str(bad)})),
                   ("prepare",))


def test_phantom_findings_have_their_own_masks_and_grades_grow_with_the_lesion(params):
    import dataclasses

    multi = dataclasses.replace(params.data.phantom, task="multilabel", n_train=120)
    split = phantom.generate_split(multi, 0, "train")
    assert split["labels"].shape == (120, 3)
    for k in range(3):
        present = split["labels"][:, k] == 1
        assert present.any() and not present.all()
        has_mask = np.array([(m == k + 1).any() for m in split["masks"]])
        assert np.array_equal(has_mask, present), phantom.FINDINGS[k]
    graded = dataclasses.replace(params.data.phantom, task="ordinal", n_train=120)
    split = phantom.generate_split(graded, 0, "train")
    area = split["masks"].reshape(120, -1).sum(1)
    assert set(np.unique(split["labels"])) == {0, 1, 2, 3} and (area[split["labels"] == 0] == 0).all()
    means = [area[split["labels"] == g].mean() for g in (1, 2, 3)]
    assert means[0] < means[1] < means[2]


@pytest.mark.parametrize("task", ["multilabel", "ordinal"])
def test_both_tasks_run_through_the_stages_and_predict_scores_as_evaluate(tmp_path, task, mlflow_store):
    extra = {"train.loss": "corn"} if task == "ordinal" else {}
    params = tiny_params(tmp_path, **{"data.phantom.task": task, "evaluate.baselines": ["logistic_regression"],
                                      "evaluate.external": [SITE_C], **extra})
    run_stages(tmp_path, params, ("prepare", "balance", "train", "evaluate", "explain", "report"))
    metrics = json.loads((tmp_path / "reports/eval/metrics.json").read_text())
    assert metrics["task"] == task and metrics["test"]["n"] == 80
    headline = "kappa" if task == "ordinal" else "roc_auc"
    low, high = metrics["test"][f"{headline}_ci_low"], metrics["test"][f"{headline}_ci_high"]
    assert low is not None and low <= metrics["test"][headline] <= high
    # the external site: the task's own metrics with CIs, at the frozen thresholds, its calibration
    site = metrics["external"]["sites"]["site_c"]
    assert site["test"]["n"] == site["n"] == 80 and site["test"][headline] is not None
    assert site["recalibrated"]["untouched"]["n"] == site["recalibrated"]["scored_on"]
    assert site["calibration"]["citl_ci_low"] <= site["calibration"]["citl"] <= site["calibration"]["citl_ci_high"]
    if task == "multilabel":  # each finding: assessed share present, and the share its frozen threshold flags
        rows = [r.split(",") for r in (tmp_path / "reports/eval/external/site_c.csv").read_text().splitlines()]
        flagged = [sum("nodule" in r[rows[0].index("prediction")].split("|") for r in rows[1:]) / 80]
        assert site["flagged"]["nodule"] == pytest.approx(flagged[0], abs=1e-6)
        assert set(site["test"]["findings"]) == set(phantom.FINDINGS)
    page = (tmp_path / "reports/report.html").read_text()
    assert "<h3>External validation</h3>" in page and "<td>site_c</td>" in page
    package = load_package(tmp_path / "models/model.pt")
    assert package.task == task
    images = np.load(tmp_path / "data/prepared/test/images.npy")[:5]
    scored = package.score(images)
    rows = (tmp_path / "reports/eval/predictions.csv").read_text().splitlines()
    header = rows[0].split(",")
    first = dict(zip(header, rows[1].split(",")))
    name = package.class_names[0]
    assert float(first[f"prob_{name}"]) == pytest.approx(scored.probabilities[0, 0], abs=1e-6)
    assert first["prediction"] == package.describe(scored.predictions[0])
    # the ONNX export computes the task's calibration and decision in its graph, as the package does
    found = export.run(tmp_path / "models/model.pt", tmp_path / "model.onnx", "onnx", tmp_path / "data/prepared")
    assert found["decisions_equal"] and found["max_abs_difference"] <= export.TOLERANCE
    explained = json.loads((tmp_path / "reports/explain/samples.json").read_text())
    located = json.loads((tmp_path / "reports/explain/metrics.json").read_text())["explain"]["saliency"]
    # the baseline, one-vs-rest per finding, scored like the CNN with thresholds of its own
    baseline = metrics["baselines"]["logistic_regression"]
    assert baseline["n"] == 80 and baseline[headline] is not None
    assert (len(baseline["threshold"]) == 3) if task == "multilabel" else baseline["threshold"] is None
    # MLflow: every per-finding metric under its own name, the task's headline first
    from mlflow.tracking import MlflowClient

    from pipeline import track

    record = track.run(params, tmp_path, tmp_path / "reports/mlflow_run.json")
    logged = MlflowClient(record["tracking_uri"]).get_run(record["run_id"]).data.metrics
    assert logged[f"Headline.test.{headline}"] == pytest.approx(metrics["test"][headline])
    if task == "multilabel":
        # pipeline.predict and the MLflow model (what `mlflow models serve` runs) answer alike
        from pipeline import predict
        from pipeline.modeling import pyfunc

        np.savez(tmp_path / "new.npz", test_images=images)
        predict.run(tmp_path / "new.npz", tmp_path / "out.csv", tmp_path / "models/model.pt")
        answers = (tmp_path / "out.csv").read_text().splitlines()
        assert answers[0] == "id,prob_nodule,prob_consolidation,prob_calcification,prediction,status"
        served = pyfunc._load_pyfunc(str(tmp_path / "models/model.pt")).predict(images)
        for row, (_, answer) in zip(answers[1:], served.iterrows()):
            cells = row.split(",")
            assert float(cells[1]) == pytest.approx(answer["prob_nodule"], abs=1e-6)
            assert cells[4] == answer["prediction"] and set(cells[4].split("|")) <= {*phantom.FINDINGS, "none"}
        for finding in phantom.FINDINGS:
            found = metrics["test"]["findings"][finding]
            assert logged[f"test.findings.{finding}.n"] == found["n"]
            value = found["average_precision"]
            assert logged.get(f"test.findings.{finding}.average_precision") == (
                None if value is None else pytest.approx(value))
        # each finding's map, and its localisation against that finding's own mask
        assert {s["explained"] for s in explained["samples"]} <= set(phantom.FINDINGS)
        assert set(located["localisation_by_finding"]) == set(phantom.FINDINGS)
        assert set(explained["localisation"]["findings"]) == set(phantom.FINDINGS)
        assert scored.probabilities.shape == (5, 3) and len(package.threshold) == 3
        assert header[:3] == ["id", "label", "prediction"] and "roc_auc" in metrics["test"]["findings"]["nodule"]
    else:
        assert scored.probabilities.shape == (5, 4) and np.allclose(scored.probabilities.sum(1), 1)
        assert package.threshold is None and package.threshold_rule == "median grade"
        assert explained["decision"]["rule"] == "median grade" and located["n_masks"] > 0
        assert all(s["explained"].endswith("or above") for s in explained["samples"])
        assert len(metrics["test"]["confusion_matrix"]) == 4


def test_a_multilabel_manifest_has_a_column_per_finding(tmp_path):
    from tests.test_sources_files import manifest, prepare_run

    values = ["1", "0", "", "-1", "1.0", "0.0"]
    rows = [f"img/p{p:02d}_{k}.png,MRN{p:05d},{values[(p + k) % 6]},{values[(p * 2 + k) % 6]}"
            for p in range(20) for k in range(3)]
    path = manifest(tmp_path, rows, header="path,patient_id,effusion,edema")
    summary = prepare_run(tmp_path, **{"data.source": "csv", "data.path": str(path),
                                       "data.class_names": ["effusion", "edema"]})
    assert summary["task"] == "multilabel" and summary["class_names"] == ["effusion", "edema"]
    assert "stratified by number of findings" in summary["split_method"]
    labels = np.concatenate([np.load(tmp_path / "prepared" / s / "labels.npy") for s in ("train", "val", "test")])
    assert labels.shape == (60, 2) and set(np.unique(labels)) == {-1, 0, 1}
    unknown = [cell in ("", "-1") for row in rows for cell in row.split(",")[2:]]  # "" and "-1": not assessed
    assert (labels == -1).sum() == sum(unknown)
    assert sum(summary["splits"][s]["unknown_counts"]["edema"] for s in ("train", "val", "test")) == sum(unknown[1::2])
    bad = manifest(tmp_path / "bad", [f"img/a{i}.png,P{i},1,maybe" for i in range(6)],
                   header="path,patient_id,effusion,edema")
    with pytest.raises(PipelineError, match="finding values must be 1, 0, -1 or empty"):
        prepare_run(tmp_path / "bad", **{"data.source": "csv", "data.path": str(bad),
                                         "data.class_names": ["effusion", "edema"]})


@pytest.mark.parametrize(("name", "labels", "task"), [
    ("chestmnist.npz", "matrix", "multilabel"),   # N×14 findings, grayscale, partial labels
    ("retinamnist.npz", "grades", "ordinal"),     # grades 0-4, RGB: the catalog knows it is ordinal
])
def test_medmnist_layouts_run_end_to_end_by_params_alone(tmp_path, name, labels, task):
    rng = np.random.default_rng(0)
    sizes = (("train", 120), ("val", 40), ("test", 60))
    if labels == "matrix":
        arrays = {f"{s}_labels": (rng.uniform(size=(n, 14)) < 0.3).astype(np.int8) for s, n in sizes}
        arrays["train_labels"][:5, 3] = -1  # not assessed
        path = make_npz(tmp_path / name, n=tuple(n for _, n in sizes), size=16, **arrays)
    else:
        path = make_npz(tmp_path / name, n=tuple(n for _, n in sizes), classes=5, size=16, channels=3)
    params = tiny_params(tmp_path, **{"data.source": "npz", "data.path": str(path), "evaluate.baselines": [],
                                      "evaluate.corruptions": [], "explain.methods": ["saliency"]})
    run_stages(tmp_path, params, ("prepare", "balance", "train", "evaluate", "explain", "report"))
    metrics = json.loads((tmp_path / "reports/eval/metrics.json").read_text())
    assert metrics["task"] == task
    if task == "multilabel":
        assert set(metrics["test"]["findings"]) == {str(k) for k in range(14)}  # named as data.class_names says
        assert metrics["test"]["findings"]["0"]["n"] == 60
    else:
        assert 0 <= metrics["test"]["mae"] <= 4 and len(metrics["test"]["confusion_matrix"]) == 5
    assert (tmp_path / "reports/report.html").stat().st_size > 10_000


def test_the_label_aware_sampler_draws_rare_findings_as_often_as_common_ones():
    from pipeline.modeling.recipe import epoch_order

    labels = np.zeros((1000, 2), dtype=np.int64)
    labels[:400, 0] = 1   # a common finding
    labels[400:450, 1] = 1  # a rare one; the other 550 images have none
    order = epoch_order(torch.from_numpy(labels), "weighted", torch.Generator().manual_seed(0)).numpy()
    drawn = labels[order]
    common, rare, normal = (drawn[:, 0] == 1).mean(), (drawn[:, 1] == 1).mean(), (drawn.sum(1) == 0).mean()
    assert len(order) == 1000 and abs(common - rare) < 0.06 and abs(rare - normal) < 0.06  # about a third each
    assert (labels[torch.randperm(1000, generator=torch.Generator().manual_seed(0)).numpy()][:, 1] == 1).mean() == 0.05
