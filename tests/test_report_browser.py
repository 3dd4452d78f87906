"""The report in a real browser: every section renders, no request leaves the file, a screenshot.

Uses Debian's headless Chromium (``.ci/run`` installs it when missing; skipped elsewhere). The
network check reads Chromium's own net log; a control page with one external image proves the
check can see a request before it is trusted to see none.
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-default-apps", "--mute-audio"]
SECTIONS = ["summary", "data", "preprocessing", "model", "results", "failures", "explanations",
            "reproducibility", "limitations"]


def browse(page: Path, tmp: Path, *extra: str) -> tuple[str, list[str]]:
    """The rendered DOM and every URL the page itself asked Chromium's network stack for."""
    netlog = tmp / f"{page.stem}-net.json"
    profile = tmp / f"{page.stem}-profile"
    result = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--log-net-log={netlog}",
                             "--virtual-time-budget=5000", *extra, page.as_uri()],
                            capture_output=True, text=True, timeout=120)
    text = netlog.read_text().rstrip()
    if not text.endswith("}"):  # Chromium may end the log mid-list when it exits
        text = text.rstrip(",") + "]}"
    events = json.loads(text)["events"]
    urls = [e["params"]["url"] for e in events
            if "url" in e.get("params", {}) and e["params"].get("network_isolation_key", "").startswith("file://")]
    return result.stdout, urls


def external(urls: list[str]) -> list[str]:
    return [u for u in urls if not u.startswith(("file:", "data:"))]


def test_control_page_request_is_detected(tmp_path):
    page = tmp_path / "control.html"
    page.write_text('<html><body><img src="http://127.0.0.1:9/pixel.png"></body></html>')
    _, urls = browse(page, tmp_path, "--dump-dom")
    assert any("127.0.0.1:9/pixel.png" in u for u in external(urls))


def test_report_renders_offline_with_every_section(tiny_run, tmp_path):
    root, _ = tiny_run
    report = root / "reports/report.html"
    dom, urls = browse(report, tmp_path, "--dump-dom")
    for section in SECTIONS:
        assert f'<section id="{section}">' in dom, section
    assert external(urls) == []
    shot = tmp_path / "report.png"
    browse(report, tmp_path, f"--screenshot={shot}", "--window-size=1100,2400", "--hide-scrollbars")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    keep = Path(__file__).resolve().parents[1] / ".pytest_cache" / "report-screenshot.png"
    keep.parent.mkdir(exist_ok=True)
    shutil.copy(shot, keep)
