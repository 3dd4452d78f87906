"""report: self-contained, every section present, numbers match the metrics files."""

import re

from pipeline.files import read_json
from pipeline.report import _fmt

SECTIONS = ["summary", "data", "preprocessing", "model", "results", "explanations", "reproducibility", "limitations"]


def test_sections_in_order_and_self_contained(tiny_run):
    root, _ = tiny_run
    page = (root / "reports/report.html").read_text()
    positions = [page.index(f'<section id="{s}">') for s in SECTIONS]
    assert positions == sorted(positions)
    # Nothing is fetched: no external URL in src/href, no scripts, images embedded.
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', page)
    assert "<script" not in page and "<link" not in page
    assert page.count('src="data:image/png;base64,') >= 4


def test_report_numbers_match_metrics(tiny_run):
    root, _ = tiny_run
    page = (root / "reports/report.html").read_text()
    test = read_json(root / "reports/eval/metrics.json")["test"]
    for key in ("accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity", "f1"):
        assert f"<td>{key}</td><td>{_fmt(test[key])}</td>" in page, key
    summary = read_json(root / "reports/data/summary.json")
    for digest in summary["outputs_sha256"].values():
        assert digest in page
    assert "simulated phantom" in page
