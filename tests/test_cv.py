"""Cross-validation (``cv.folds``): folds of whole patients, the fold stages, the ensemble as one
model, the out-of-fold estimate, the report's sentences and the nested MLflow runs."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.errors import PipelineError
from pipeline.data.patient_split import cv_folds
from pipeline.evaluation.metrics import roc_auc
from pipeline.modeling.checkpoints import load_checkpoint, save_checkpoint
from pipeline.modeling.networks import Ensemble, ModelConfig, build_model, predict_proba
from tests.conftest import REPO, run_stages, tiny_params

FOLDS = [1, 2, 3]


def test_folds_keep_patients_whole_stratify_and_repeat_with_the_seed():
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(60), 3)  # three images per patient
    labels = np.repeat((np.arange(60) % 4 == 0).astype(int), 3)  # a quarter of the patients positive
    folds = cv_folds(labels, patients.astype(str), 5, seed=3)
    assert set(folds) == {1, 2, 3, 4, 5}
    for patient in np.unique(patients):
        assert len(set(folds[patients == patient])) == 1, "a patient was split across folds"
    prevalence = [labels[folds == k].mean() for k in range(1, 6)]
    assert max(prevalence) - min(prevalence) < 0.15 and min(prevalence) > 0
    assert np.array_equal(folds, cv_folds(labels, patients.astype(str), 5, seed=3))
    assert not np.array_equal(folds, cv_folds(labels, patients.astype(str), 5, seed=4))
    del rng


def test_folds_refuse_too_few_patients_or_a_class_missing_from_a_fold():
    with pytest.raises(PipelineError, match="5 folds need at least 5 patients"):
        cv_folds(np.array([0, 1, 0, 1]), np.array(["a", "b", "c", "d"]), 5, seed=0)
    labels = np.array([0] * 20 + [1] * 2)
    with pytest.raises(PipelineError, match="holds no image of class"):
        cv_folds(labels, np.arange(22).astype(str), 5, seed=0)


@pytest.mark.parametrize("folds, ok", [([], True), ([1, 2], True), ([1, 2, 3, 4, 5], True), ([1], False),
                                       ([2, 3], False), ([1, 3], False), ([0, 1], False)])
def test_cv_folds_param_is_the_fold_numbers_in_order(tmp_path, folds, ok):
    if ok:
        assert tiny_params(tmp_path, **{"cv.folds": folds}).cv.k == len(folds)
    else:
        with pytest.raises(PipelineError, match="cv.folds"):
            tiny_params(tmp_path, **{"cv.folds": folds})


def members(k: int = 3) -> list:
    torch.manual_seed(0)
    config = ModelConfig(name="small_cnn", in_channels=1, num_classes=2, image_size=16, width=4, mean=0.4, std=0.2)
    return [build_model(config).eval() for _ in range(k)]


def test_ensemble_is_the_mean_of_its_members_calibrated_probabilities(tmp_path):
    nets, temperatures = members(), [0.5, 1.0, 2.0]
    ensemble = Ensemble(nets, temperatures).eval()
    images = np.random.default_rng(1).integers(0, 256, (10, 16, 16, 1), dtype=np.uint8)
    expected = np.mean([torch.softmax(torch.from_numpy(np.log(predict_proba(n, images))) / t, dim=1).numpy()
                        for n, t in zip(nets, temperatures)], axis=0)
    assert np.allclose(predict_proba(ensemble, images), expected, atol=1e-5)
    assert np.allclose(predict_proba(ensemble, images).sum(axis=1), 1.0)
    # One file, loadable weights-only, the same outputs after the round trip.
    save_checkpoint(tmp_path / "ensemble.pt", ensemble, {"class_names": ["a", "b"]})
    loaded, extra = load_checkpoint(tmp_path / "ensemble.pt")
    assert isinstance(loaded, Ensemble) and len(loaded.members) == 3 and extra["class_names"] == ["a", "b"]
    assert torch.equal(loaded.temperatures, torch.tensor(temperatures))
    assert np.array_equal(predict_proba(loaded, images), predict_proba(ensemble, images))
    with pytest.raises(PipelineError, match="two or more members"):
        Ensemble(nets[:1], [1.0])


@pytest.fixture(scope="session")
def cv_run(tmp_path_factory: pytest.TempPathFactory):
    """The tiny phantom, 3-fold: prepare, balance, the fold stages, the ensemble, evaluate, explain, report."""
    from pipeline import fold, train

    root = tmp_path_factory.mktemp("cv_run")
    params = tiny_params(root, **{"cv.folds": FOLDS, "explain.methods": ["saliency", "grad_cam", "guided_grad_cam"]})
    run_stages(root, params, ("prepare", "balance"))
    with __import__("contextlib").chdir(root):
        for number in FOLDS:
            fold.run(params, number)
        train.assemble(params)
    run_stages(root, params, ("evaluate", "explain", "report"))
    return root, params


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_every_development_image_is_held_out_once_and_scored_by_the_member_that_never_saw_it(cv_run):
    root, params = cv_run
    summary = json.loads((root / "reports/data/summary.json").read_text())["splits"]
    development = summary["train"]["n"] + summary["val"]["n"]
    records = [json.loads((root / f"reports/folds/{n}/metrics.json").read_text())["fold"] for n in FOLDS]
    assert sum(r["held_out_images"] for r in records) == development
    assert all(r["train_images"] + r["held_out_images"] == development for r in records)
    oof = read_rows(root / "reports/eval/val_predictions.csv")
    assert len(oof) == development and len({r["id"] for r in oof}) == development
    metrics = json.loads((root / "reports/eval/metrics.json").read_text())
    cv = metrics["cross_validation"]
    assert cv["folds"] == 3 and cv["images"] == development
    assert sum(row["n"] for row in cv["per_fold"].values()) == development
    # The per-fold AUCs are the fold stages' own; the mean and sd are theirs; the pooled AUC is the file's.
    assert [cv["per_fold"][str(n)]["roc_auc"] for n in FOLDS] == pytest.approx([r["roc_auc"] for r in records],
                                                                               abs=1e-5)
    aucs = [cv["per_fold"][str(n)]["roc_auc"] for n in FOLDS]
    assert cv["mean"]["roc_auc"] == pytest.approx(np.mean(aucs), abs=1e-6)
    assert cv["sd"]["roc_auc"] == pytest.approx(np.std(aucs, ddof=1), abs=1e-6)
    labels = np.array([r["label"] == "lesion" for r in oof], dtype=int)
    scores = np.array([float(r["prob_lesion"]) for r in oof])
    assert cv["pooled"]["roc_auc"] == pytest.approx(roc_auc(labels, np.c_[1 - scores, scores]), abs=1e-4)
    # The pooled decisions are at the ensemble's threshold, each fold's at its own.
    threshold = metrics["test"]["threshold"]
    assert cv["pooled"]["sensitivity"] == pytest.approx(np.mean(scores[labels == 1] >= threshold), abs=1e-4)
    assert [cv["per_fold"][str(n)]["threshold"] for n in FOLDS] == pytest.approx([r["threshold"] for r in records])
    assert metrics["privacy_audit"]["non_members_from"] == "a seeded half of the test split"


def test_the_package_holds_the_ensemble_of_the_fold_models(cv_run):
    from pipeline.core.dataset import load_split
    from pipeline.modeling.package import load_package

    root, _ = cv_run
    package = load_package(root / "models/model.pt")
    assert isinstance(package.network, Ensemble) and len(package.network.members) == 3
    assert package.temperature == 1.0
    fold_temperatures = [json.loads((root / f"reports/folds/{n}/metrics.json").read_text())["fold"]["temperature"]
                         for n in FOLDS]
    assert package.network.temperatures.tolist() == pytest.approx(fold_temperatures, rel=1e-6)
    for member, n in zip(package.network.members, FOLDS):  # the members are the fold stages' networks, bit for bit
        network, _ = load_checkpoint(root / f"models/folds/{n}/network.pt")
        assert all(torch.equal(a, b) for a, b in zip(member.state_dict().values(), network.state_dict().values()))
    test = load_split(root / "data/prepared", "test")
    images = np.asarray(test["images"][:16])
    members = [predict_proba(m, images) for m in package.network.members]
    calibrated = [package.kind.calibrate(p, t) for p, t in zip(members, fold_temperatures)]
    assert np.allclose(package.score(images).probabilities, np.mean(calibrated, axis=0), atol=1e-5)
    predictions = read_rows(root / "reports/eval/predictions.csv")[:16]
    assert np.allclose([float(r["prob_lesion"]) for r in predictions], package.score(images).probabilities[:, 1],
                       atol=1e-6)


def test_predict_scores_new_images_with_the_ensemble(cv_run, tmp_path):
    from pipeline.core.dataset import load_split

    root, _ = cv_run
    test = load_split(root / "data/prepared", "test")
    np.savez(tmp_path / "new.npz", test_images=np.asarray(test["images"][:5])[..., 0], test_labels=test["labels"][:5])
    out = subprocess.run([sys.executable, "-m", "pipeline.predict", str(tmp_path / "new.npz"), "-o",
                          str(tmp_path / "scores.csv"), "--model", str(root / "models/model.pt")],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    scored = read_rows(tmp_path / "scores.csv")
    expected = read_rows(root / "reports/eval/predictions.csv")[:5]
    assert [round(float(r["prob_lesion"]), 4) for r in scored] == [round(float(r["prob_lesion"]), 4) for r in expected]


def test_report_states_the_cross_validation_from_the_run_records(cv_run):
    root, _ = cv_run
    html = (root / "reports/report.html").read_text()
    metrics = json.loads((root / "reports/eval/metrics.json").read_text())
    cv, test = metrics["cross_validation"], metrics["test"]
    assert f"3-fold cross-validation over the {cv['images']} development images" in html
    assert "chosen on the pooled out-of-fold predictions" in html and "chosen on the validation split" not in html
    assert "fold models&#39; decisions (each at its own threshold) differ on" in html
    assert "ensemble of 3 fold models, each small_cnn" in html
    side = ("overlap" if not (test["roc_auc_ci_high"] < cv["pooled"]["roc_auc_ci_low"]
                              or test["roc_auc_ci_low"] > cv["pooled"]["roc_auc_ci_high"]) else "wholly")
    assert f"the ensemble on the test split: the two intervals {side}" in html or side == "wholly"
    assert "The out-of-fold predictions (" in html  # the limitation names what was reused, not "One validation split"
    card = (root / "reports/model_card.md").read_text()
    assert "Ensemble of 3 small_cnn CNNs (one per cross-validation fold)" in card
    assert f"over {cv['images']} development images: pooled out-of-fold ROC AUC" in card
    assert "chosen on the pooled out-of-fold predictions" in card
    failures = json.loads((root / "reports/eval/failures.json").read_text())
    assert len(failures["fold_disagreements"]) > 0
    spread = [r["score"] for r in failures["fold_disagreements"]]
    assert spread == sorted(spread, reverse=True)
    assert all(r["score"] == pytest.approx(np.std(r["members"]), abs=2e-6) for r in failures["fold_disagreements"])


def test_explain_explains_the_ensemble_where_the_folds_disagree(cv_run):
    root, _ = cv_run
    samples = json.loads((root / "reports/explain/samples.json").read_text())
    assert any("the fold models disagree most" in s["why"] for s in samples["samples"])
    maps = np.load(root / "reports/explain/attributions.npy", allow_pickle=False)
    assert np.isfinite(maps).all() and np.abs(maps).sum() > 0


def test_track_nests_one_run_per_fold_under_the_execution(cv_run, mlflow_store):
    from mlflow.tracking import MlflowClient

    from pipeline import track

    root, params = cv_run
    root = shutil.copytree(root, mlflow_store / "run")
    record = track.run(params, root, root / "reports/mlflow_run.json")
    client = MlflowClient(f"sqlite:///{mlflow_store}/mlflow.db")
    parent = client.get_run(record["run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.params["cv.fold"] for c in children) == ["1", "2", "3"]
    for child in children:
        fold = json.loads((root / f"reports/folds/{child.data.params['cv.fold']}/metrics.json").read_text())
        assert child.data.metrics["fold.roc_auc"] == pytest.approx(fold["fold"]["roc_auc"])
        assert child.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "epoch.val_roc_auc")] == [1, 2]
    assert parent.data.metrics["cross_validation.pooled.roc_auc"] > 0
    assert "train.per_fold.1.best_epoch" in parent.data.metrics
    # The registered MLflow model (what `mlflow models serve` serves) is the ensemble's package.
    import mlflow

    from pipeline.core.dataset import load_split
    from pipeline.modeling.package import load_package

    model = mlflow.pyfunc.load_model(f"models:/{record['registered_model']}/{record['model_version']}")
    images = load_split(root / "data/prepared", "test")["images"][:8]
    expected = load_package(root / "models/model.pt").score(images)
    np.testing.assert_allclose(model.predict(images)[["prob_normal", "prob_lesion"]].to_numpy(),
                               expected.probabilities, atol=1e-9)
