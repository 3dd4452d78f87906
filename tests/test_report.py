"""report: CLAIM sections in order, self-contained, every number equal to the metrics files; model card."""

import copy
import json
import dataclasses
import re

import pytest
from markupsafe import escape

from pipeline import report
from pipeline.core.files import read_json
from pipeline.evaluation.metrics import HEADLINE
from pipeline.reporting import content
from pipeline.reporting.content import augmentation_text, fmt, fmt_ci

SECTIONS = ["summary", "data", "preprocessing", "model", "results", "failures", "explanations", "privacy",
            "reproducibility", "limitations"]
CARD_SECTIONS = ["Model Details", "Intended Use", "Factors", "Metrics", "Evaluation Data", "Training Data",
                 "Quantitative Analyses", "Ethical Considerations", "Caveats and Recommendations"]


def cell(value) -> str:
    return f"<td>{fmt(value)}</td>"


def test_sections_in_order_and_self_contained(tiny_run):
    root, _ = tiny_run
    page = (root / "reports/report.html").read_text()
    positions = [page.index(f'<section id="{s}">') for s in SECTIONS]
    assert positions == sorted(positions)
    # Nothing is fetched: no external URL anywhere in an attribute, no scripts or links.
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', page)
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert page.count('src="data:image/png;base64,') >= 8


def test_every_metric_in_the_report_matches_metrics_json(tiny_run):
    root, _ = tiny_run
    page = (root / "reports/report.html").read_text()
    result = read_json(root / "reports/eval/metrics.json")
    test = result["test"]
    for key in HEADLINE:
        assert f"<td>{key}</td>{cell(test[key])}<td>{fmt_ci(test, key)}</td>" in page, key
    assert f"threshold {fmt(test['threshold'])}" in page
    for when in ("before", "after"):
        c = result["calibration"][when]
        assert (f"<td>{when}</td>{cell(c['ece'])}<td>{fmt_ci(c, 'ece')}</td>{cell(c['slope'])}<td>{fmt_ci(c, 'slope')}"
                f"</td>{cell(c['intercept'])}") in page
    for name, m in result["baselines"].items():
        assert f"<td>{name}</td><td>{fmt(m['roc_auc'])} ({fmt_ci(m, 'roc_auc')})</td>" in page
    for group, m in result["subgroups"]["site"].items():
        assert f"<td>{group}</td>{cell(m['n'])}{cell(m['roc_auc'])}" in page
    summary = read_json(root / "reports/data/summary.json")
    for digest in summary["outputs_sha256"].values():
        assert digest in page
    for failure in read_json(root / "reports/eval/failures.json")["false_positives"]:
        assert f"<td>{failure['id']}</td>" in page


def test_model_section_states_the_training_recipe(tiny_run):
    root, params = tiny_run
    page = (root / "reports/report.html").read_text()
    cfg = params.train
    assert f"<td>learning-rate schedule</td><td>{cfg.schedule}" in page
    assert f"<td>augmentation</td><td>seeded: rotation ±{cfg.aug_rotate}°, zoom ±{cfg.aug_scale}</td>" in page
    assert f"exponential moving average of the weights, decay {cfg.ema}" in page
    assert augmentation_text(dataclasses.replace(cfg, aug_rotate=0.0, aug_scale=0.0)) == "none"
    assert augmentation_text(dataclasses.replace(cfg, aug_flip=True)).endswith(", horizontal flips")


def test_limitations_are_automatic(tiny_run):
    root, _ = tiny_run
    page = (root / "reports/report.html").read_text()
    limits = page[page.index('<section id="limitations">'):]
    assert "simulated phantom" in limits and "No external test set" not in limits  # the tiny run has site_c
    # 80 test images: the AUC interval is wide, and the report must say so.
    test = read_json(root / "reports/eval/metrics.json")["test"]
    if test["roc_auc_ci_high"] - test["roc_auc_ci_low"] > 0.1:
        assert "Small test set" in limits


def test_model_card_sections(tiny_run):
    root, _ = tiny_run
    card = (root / "reports/model_card.md").read_text()
    positions = [card.index(f"## {s}\n") for s in CARD_SECTIONS]
    assert positions == sorted(positions)
    test = read_json(root / "reports/eval/metrics.json")["test"]
    assert f"| roc_auc | {fmt(test['roc_auc'])} | {fmt_ci(test, 'roc_auc')} |" in card


@pytest.fixture
def records(tiny_run):
    return content.load_records(tiny_run[0])


def with_train(params, **changes):
    return dataclasses.replace(params, train=dataclasses.replace(params.train, **changes))


def test_preprocessing_sentences_follow_the_records(tiny_run, records):
    root, params = tiny_run
    page = (root / "reports/report.html").read_text()
    for fact in content.preprocessing_facts(params, records):
        assert f"<li>{escape(fact)}</li>" in page
    assert "no resizing or augmentation" not in page
    data = copy.deepcopy(records["data"])
    assert content.resize_text(data) == "Size: images kept at their stored size (32×32); no resizing."
    data["preprocessing"].update(image_size=32, resized=0)
    assert "none was resized" in content.resize_text(data)
    data["preprocessing"].update(resized=7, original_sizes={"28x28": 7, "32x32": 3})
    assert content.resize_text(data).startswith("Size: 7 image(s) centre-cropped to a square and resized (bilinear) to 32×32")
    assert "28x28 (7)" in content.resize_text(data)
    assert content.channels_text(data) == "Channels: 1, as stored; no conversion."
    data["preprocessing"]["channels_converted"] = 5
    assert "RGB to grayscale" in content.channels_text(data)
    data["channels"] = 3
    assert "grayscale copied to 3 channels" in content.channels_text(data)
    assert content.dicom_text(data) is None
    data["dicom"] = {"Modality=CT": 3}
    assert "each file's own VOI LUT or window" in content.dicom_text(data)
    data["preprocessing"]["dicom"].update(window_center=40.0, window_width=400.0)
    assert "center 40.0, width 400.0" in content.dicom_text(data)
    config = records["model_config"]
    assert f"mean {fmt(config['mean'])}" in content.standardisation_text(config)


def test_augmentation_sentence_follows_params(tiny_run, records):
    _, params = tiny_run
    none = with_train(params, aug_rotate=0.0, aug_scale=0.0)
    assert "Training augmentation: none" in " ".join(content.preprocessing_facts(none, records))
    flips = with_train(params, aug_flip=True, aug_intensity=0.1)
    assert "brightness/contrast ±0.1, horizontal flips" in " ".join(content.preprocessing_facts(flips, records))


def test_data_sentences_follow_the_summary(records):
    data = copy.deepcopy(records["data"])
    assert content.source_text(data).startswith("data.source phantom: medcnn phantom")
    assert content.split_text(data) == f"Split: {data['split_method']}."
    data["split_method"] = "grouped by patient and stratified by label (val 0.1, test 0.2, seed 42)"
    assert "grouped by patient" in content.split_text(data)
    assert content.inclusion_text(data).endswith("no file excluded.")
    data["excluded"], data["checks"]["duplicates_dropped"] = 3, 2
    assert "3 file(s) excluded" in content.inclusion_text(data)
    assert "2 exact duplicate image(s) dropped" in content.inclusion_text(data)
    data["input"] = {"source": "npz", "path": "breastmnist.npz"}
    assert content.source_text(data) == "data.source npz: breastmnist (MedMNIST)"
    data["input"] = {"source": "folder", "path": "scans"}
    assert content.source_text(data) == "data.source folder: scans"


def test_training_sentences_follow_params(tiny_run, records):
    _, params = tiny_run
    rows = dict((r[0], r[1]) for r in content.model_rows(params, records))
    assert rows["batches"].startswith(f"{params.train.batch_size} images, seeded shuffle")
    assert rows["learning-rate schedule"] == content.SCHEDULE_TEXT[params.train.schedule]
    changed = with_train(params, sampler="weighted", loss="focal", schedule="onecycle", warmup_epochs=1,
                         label_smoothing=0.1, ema=0.0)
    rows = dict((r[0], r[1]) for r in content.model_rows(changed, records))
    assert "class-balanced draw" in rows["batches"]
    assert rows["loss"].startswith("focal (gamma") and "label smoothing 0.1" in rows["loss"]
    assert rows["learning-rate schedule"].startswith("one-cycle") and "1 linear warm-up" in rows["learning-rate schedule"]
    assert "moving average" not in rows["stopping and selection"]


def test_imbalance_calibration_and_threshold_sentences(records):
    for strategy, text in content.STRATEGY_TEXT.items():
        assert content.imbalance_text({**records["balance"], "strategy": strategy}, content.TASK_WORDS[None]).startswith(f"Imbalance handling: {text}")
    calib = records["eval"]["calibration"]
    assert f"temperature {fmt(calib['temperature'])}" in content.calibration_text(calib, ["normal", "lesion"])
    assert content.calibration_text({**calib, "method": "none"}, ["normal", "lesion"]).startswith("Calibration: none")
    test = records["eval"]["test"]
    assert f"rule '{test['threshold_rule']}'" in content.decision_text(test)
    assert "highest probability" in content.decision_text({**test, "threshold": None})


def test_rendered_report_follows_a_changed_param(tiny_run, tmp_path):
    """End to end through the template: another augmentation setting, another sentence."""
    root, params = tiny_run
    changed = with_train(params, aug_rotate=0.0, aug_scale=0.0, aug_flip=True)
    report.run(changed, root, tmp_path / "report.html", tmp_path / "card.md")
    page = (tmp_path / "report.html").read_text()
    assert "<li>Training augmentation: seeded: horizontal flips" in page
    assert "rotation ±" not in page


def test_privacy_section_states_the_runs_guarantee_and_audit(tiny_run):
    root, _ = tiny_run
    page = (root / "reports/report.html").read_text()
    section = page[page.index('<section id="privacy">'):page.index('<section id="reproducibility">')]
    assert "Trained without differential privacy" in section and "DP-SGD" not in section
    audit = json.loads((root / "reports/eval/metrics.json").read_text())["privacy_audit"]
    assert f"{audit['members']} training images" in section
    for attack in audit["attacks"].values():
        assert f"<td>{content.fmt(attack['roc_auc'])}</td>" in section
    spent = {"epsilon": 2.5, "delta": 1e-5, "accountant": "prv", "steps": 120, "sample_rate": 0.05, "max_grad_norm": 1.0,
             "noise_multiplier": 1.1, "secure_mode": False}
    text = " ".join(content.privacy_guarantee_text({"privacy": spent}))
    assert "(2.5, 1e-05)-differential privacy per training image" in text and "PRV accountant over 120 steps" in text
    assert "seeded generator" in text and "validation split" in text
