"""report: CLAIM sections in order, self-contained, every number equal to the metrics files; model card."""

import dataclasses
import re

from pipeline.files import read_json
from pipeline.metrics import HEADLINE
from pipeline.report import augmentation_text, fmt, fmt_ci

SECTIONS = ["summary", "data", "preprocessing", "model", "results", "failures", "explanations",
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
        assert f"<td>{when}</td>{cell(c['ece'])}{cell(c['slope'])}{cell(c['intercept'])}" in page
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
    assert "simulated phantom" in limits and "No external test set" in limits
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
