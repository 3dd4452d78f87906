"""External validation (``evaluate.external``): sites prepared like the development data, scored
by the frozen model, their calibration and heterogeneity measured, and every refusal named."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.core.config import ExternalParams
from pipeline.core.dataset import load_meta, load_split
from pipeline.core.errors import PipelineError
from pipeline.data import external
from pipeline.evaluation import sites
from tests.conftest import make_npz, tiny_params


def rows_of(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_site_is_scored_by_the_frozen_model_and_its_numbers_follow_its_predictions(tiny_run):
    root, params = tiny_run
    found = json.loads((root / "reports/eval/metrics.json").read_text())
    site = found["external"]["sites"]["site_c"]
    predictions = rows_of(root / "reports/eval/external/site_c.csv")
    assert len(predictions) == site["n"] == params.data.phantom.n_test
    labels = np.array([row["label"] == "lesion" for row in predictions], dtype=int)
    p = np.array([float(row["prob_lesion"]) for row in predictions])
    assert site["test"]["roc_auc"] == pytest.approx(roc_auc_score(labels, p), abs=1e-5)
    # calibration-in-the-large: the observed share of lesions minus the mean predicted probability
    assert site["calibration"]["citl"] == pytest.approx(labels.mean() - p.mean(), abs=1e-5)
    assert site["prevalence"]["lesion"] == pytest.approx(labels.mean(), abs=1e-6)
    # the site is the phantom's shifted scanner: its own seed, a higher prevalence than development's
    assert site["input"]["shift"] == external.SHIFT and site["input"]["seed"] == params.seed + external.SEED_OFFSET
    assert site["prevalence"]["lesion"] > params.data.phantom.prevalence and site["in_development"] == 0
    # decisions at the frozen threshold: the package's, never refitted on the site
    package = json.loads((root / "reports/eval/metrics.json").read_text())["test"]["threshold"]
    assert [row["prediction"] == "lesion" for row in predictions] == list(p >= package)
    assert 0 <= site["out_of_distribution"] <= 1 and set(site["decision_stability"]) == {
        *params.evaluate.corruptions, "mean"}
    # the recalibrated part: fitted on a stratified 30%, both estimates on the same remaining images
    recal = site["recalibrated"]
    assert recal["fitted_on"] + recal["scored_on"] == site["n"] and recal["fitted_on"] == round(0.3 * site["n"])
    assert recal["untouched"]["n"] == recal["recalibrated"]["n"] == recal["scored_on"]
    # temperature scaling is monotone: the ranking (ROC AUC) cannot change, only the decisions
    assert recal["untouched"]["roc_auc"] == pytest.approx(recal["recalibrated"]["roc_auc"], abs=1e-6)
    # sites.csv: the internal test split first, as the forest plot draws it; the heterogeneity over both
    table = rows_of(root / "reports/eval/external/sites.csv")
    assert [r["site"] for r in table] == ["internal test", "site_c"]
    assert float(table[0]["roc_auc"]) == pytest.approx(found["test"]["roc_auc"], abs=1e-6)
    again = sites.heterogeneity({r["site"]: (float(r["roc_auc"]), float(r["ci_low"]), float(r["ci_high"]))
                                 for r in table})
    assert again == found["external"]["heterogeneity"]["roc_auc"]
    assert (root / "reports/eval/external/forest.png").stat().st_size > 1000


def test_a_site_never_repeats_a_development_image(tiny_run):
    root, params = tiny_run
    site = ExternalParams(name="site_c", source="phantom")
    development = {hash(image.tobytes()) for split in ("train", "val", "test")
                   for image in np.asarray(load_split(root / "data/prepared", split)["images"])}
    with external.prepared_site(params.data, site, params.seed, load_meta(root / "data/prepared")) as (split, _):
        assert not development & {hash(image.tobytes()) for image in np.asarray(split["images"])}


def test_a_site_of_another_source_is_read_and_checked_like_the_development_data(rgb_run):
    root, params = rgb_run
    site = json.loads((root / "reports/eval/metrics.json").read_text())["external"]["sites"]["hospital_b"]
    assert site["n"] == 30 and site["input"]["source"] == "npz" and site["input"]["path"] == "hospital_b.npz"
    assert sum(site["class_counts"].values()) == 30 and len(site["class_counts"]) == 5


def test_heterogeneity_matches_hand_computed_values():
    # Two estimates with equal standard errors 0.1 / 1.96: pooled at the middle, Q = 2 (0.1 / se)².
    found = sites.heterogeneity({"a": (0.8, 0.7, 0.9), "b": (0.6, 0.5, 0.7)})
    assert found["pooled"] == pytest.approx(0.7)
    assert found["q"] == pytest.approx(2 * 1.959964**2, abs=1e-4) and found["df"] == 1
    assert found["p_value"] == pytest.approx(0.005574, abs=1e-5)  # chi2(1).sf(7.683)
    assert found["i2"] == pytest.approx((7.682901 - 1) / 7.682901, abs=1e-5)
    # the same estimate everywhere: no heterogeneity; fewer than two intervals: no measure
    same = sites.heterogeneity({"a": (0.8, 0.7, 0.9), "b": (0.8, 0.75, 0.85), "c": (0.8, 0.6, 1.0)})
    assert same["q"] == 0 and same["i2"] == 0 and same["p_value"] == 1
    assert sites.heterogeneity({"a": (0.8, 0.7, 0.9), "b": (0.6, None, None)}) is None


def test_transport_calibration_of_a_calibrated_model_includes_the_perfect_values():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.05, 0.95, 2000)
    labels = (rng.uniform(size=p.size) < p).astype(int)
    found = sites.transport_calibration(labels, np.stack([1 - p, p], axis=1), 1, 200, 0)
    assert found["citl_ci_low"] < 0 < found["citl_ci_high"] and found["slope_ci_low"] < 1 < found["slope_ci_high"]
    # the same model at a site where the disease is rarer: it over-predicts (citl < 0, interval excludes 0)
    rarer = (rng.uniform(size=p.size) < p / 2).astype(int)
    shifted = sites.transport_calibration(rarer, np.stack([1 - p, p], axis=1), 1, 200, 0)
    assert shifted["citl_ci_high"] < 0


def test_a_phantom_site_needs_phantom_development_data(rgb_run):
    root, params = rgb_run
    with pytest.raises(PipelineError, match="evaluate.external 'site_c' .*data.source=npz"):
        with external.prepared_site(params.data, ExternalParams(name="site_c", source="phantom"), 0,
                                    load_meta(root / "data/prepared")):
            pass


def test_a_site_the_model_cannot_take_is_refused_by_name(rgb_run, tmp_path):
    root, params = rgb_run
    meta = load_meta(root / "data/prepared")
    small = make_npz(tmp_path / "small.npz", n=(2, 2, 10), classes=5, size=8, channels=3)
    with pytest.raises(PipelineError, match=r"evaluate.external 'small' .*small.npz.*8x8x3 .*16x16x3"):
        with external.prepared_site(params.data, ExternalParams(name="small", source="npz", path=str(small),
                                                                split="test"), 0, meta):
            pass
    # a file with the test split alone is a site (split: test), and names what it lacks for split: all
    alone = make_npz(tmp_path / "alone.npz", n=(0, 0, 10), classes=5, size=16, channels=3, train_images=None,
                     train_labels=None, val_images=None, val_labels=None)
    with external.prepared_site(params.data, ExternalParams(name="alone", source="npz", path=str(alone),
                                                            split="test"), 0, meta) as (split, summary):
        assert summary["n"] == 10 and len(split["labels"]) == 10
    with pytest.raises(PipelineError, match=r"evaluate.external 'alone' .*alone.npz: missing key 'train_images'"):
        with external.prepared_site(params.data, ExternalParams(name="alone", source="npz", path=str(alone)), 0, meta):
            pass
    gray = make_npz(tmp_path / "gray.npz", n=(2, 2, 10), classes=5, size=16)
    with pytest.raises(PipelineError, match=r"evaluate.external 'gray' .*16x16x1 .*16x16x3"):
        with external.prepared_site(params.data, ExternalParams(name="gray", source="npz", path=str(gray),
                                                                split="test"), 0, meta):
            pass
    missing = ExternalParams(name="gone", source="npz", path=str(tmp_path / "gone.npz"))
    with pytest.raises(PipelineError, match=r"evaluate.external 'gone' .*gone.npz"):
        with external.prepared_site(params.data, missing, 0, meta):
            pass


def test_a_site_without_the_findings_of_a_multilabel_model_is_refused_by_name(rgb_run, tmp_path):
    root, params = rgb_run
    meta = {**load_meta(root / "data/prepared"), "task": "multilabel"}  # five findings, one column each
    site = make_npz(tmp_path / "one_label.npz", n=(2, 2, 10), classes=5, size=16, channels=3)
    with pytest.raises(PipelineError, match=r"evaluate.external 'b' .*one_label.npz.*one column per finding"):
        with external.prepared_site(params.data, ExternalParams(name="b", source="npz", path=str(site),
                                                                split="test"), 0, meta):
            pass


@pytest.mark.parametrize(("entry", "message"), [
    ({"name": "a b", "source": "phantom"}, "name"),
    ({"name": "b", "source": "npz"}, "evaluate.external.b.path"),
    ({"name": "b", "source": "medmnist"}, "evaluate.external.b.dataset"),
    ({"name": "b", "source": "phantom", "recalibrate": 1.0}, "recalibrate"),
    ({"name": "b", "source": "phantom", "split": "holdout"}, "split"),
    ({"name": "b", "source": "phantom", "colour": "red"}, "colour"),
])
def test_bad_site_params_are_refused_by_name(tmp_path, entry, message):
    with pytest.raises(PipelineError, match=message):
        tiny_params(tmp_path, **{"evaluate.external": [entry]})


def test_two_sites_of_one_name_are_refused(tmp_path):
    site = {"name": "b", "source": "phantom"}
    with pytest.raises(PipelineError, match="site names must differ"):
        tiny_params(tmp_path, **{"evaluate.external": [site, dict(site)]})
    assert tiny_params(tmp_path).evaluate.external == ()  # the default: none


def test_copies_of_development_images_at_a_site_are_counted(rgb_run, tmp_path):
    root, params = rgb_run
    prepared = load_split(root / "data/prepared", "train")
    site = ExternalParams(name="copy", source="npz", path=str(root / "rgb5.npz"), split="train")
    development = external.image_digests(prepared["images"])
    with external.prepared_site(params.data, site, 0, load_meta(root / "data/prepared"), development) as (_, summary):
        assert summary["in_development"] == summary["n"] == len(prepared["labels"])


def test_a_folder_site_is_read_whole_with_its_class_folders(rgb_run, tmp_path):
    from PIL import Image

    root, params = rgb_run
    meta = load_meta(root / "data/prepared")
    names = [meta["class_names"][1], meta["class_names"][2]]  # a site need not hold every class
    for number, name in enumerate(names):
        (tmp_path / "site" / name).mkdir(parents=True)
        for i in range(3):
            pixels = np.random.default_rng([number, i]).integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "site" / name / f"scan{i}.png")
    site = ExternalParams(name="folder_b", source="folder", path=str(tmp_path / "site"))
    with external.prepared_site(params.data, site, 0, meta) as (split, summary):
        assert summary["n"] == 6 and summary["input"]["source"] == "folder" and summary["in_development"] == 0
        # labels are the development data's classes, not positions among the site's folders
        assert sorted(np.asarray(split["labels"]).tolist()) == [1, 1, 1, 2, 2, 2]
        assert summary["class_counts"] == {name: (3 if name in names else 0) for name in meta["class_names"]}


def test_a_recalibration_fraction_a_small_site_cannot_give_is_refused_by_name(rgb_run, tmp_path):
    from pipeline import evaluate, tasks
    from pipeline.modeling.package import load_package

    root, params = rgb_run
    meta = load_meta(root / "data/prepared")
    site = make_npz(tmp_path / "tiny_site.npz", n=(2, 2, 6), classes=5, size=16, channels=3)  # classes with 1 image
    entry = {"name": "tiny_site", "source": "npz", "path": str(site), "split": "test", "recalibrate": 0.4}
    changed = tiny_params(tmp_path, **{"data.source": "npz", "data.path": params.data.path,
                                       "data.class_names": list(params.data.class_names), "evaluate.external": [entry]})
    test = json.loads((root / "reports/eval/metrics.json").read_text())["test"]
    with pytest.raises(PipelineError, match=r"evaluate.external 'tiny_site': recalibrate 0.4 cannot be drawn from its "
                                            r"6 images"):
        evaluate.external_validation(changed, meta, tasks.for_data(meta.get("task"), meta["class_names"]),
                                     load_package(root / "models/model.pt"), test, root / "data/prepared",
                                     tmp_path / "external")
    assert not (tmp_path / "external").exists()  # nothing half-written
