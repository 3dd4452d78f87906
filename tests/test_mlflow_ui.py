"""Comparing runs in the MLflow UI, as a user does it, in a real browser.

Two logged runs that differ in one param (train.lr), an `mlflow server` on them, and Debian's
headless Chromium driven by Playwright (never a downloaded browser): the experiment opens on
its runs with distinct names, the compare view shows the dotted params and the headline
metrics first, and the per-epoch curves are there. Screenshots land in the test's temporary
folder (and in $MEDCNN_SCREENSHOTS when set) for a person to look at.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from pipeline import track, train
from tests.conftest import free_port, need_service

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ML = "workflowType=machine_learning"  # MLflow 3.17 opens on its GenAI pages otherwise


@pytest.fixture(scope="module")
def ui(tiny_run, tmp_path_factory):
    """(base URL, run ids) of an MLflow server over a store holding two runs that differ in train.lr."""
    need_service(CHROMIUM is not None, "Chromium (Debian package chromium)")
    pytest.importorskip("playwright")
    store = tmp_path_factory.mktemp("ui-store")
    root, params = tiny_run
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("DVC_EXP_NAME", raising=False)
        patch.setenv("DVC_ROOT", str(store))
        ids = [track.run(dataclasses.replace(params, train=dataclasses.replace(params.train, lr=lr)), root,
                         store / f"run-{lr}.json")["run_id"] for lr in (0.003, 0.01)]
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                               f"sqlite:///{store}/mlflow.db", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/#", ids
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server's huey workers share its group
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def page(ui):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-default-apps", "--no-first-run"])
        yield browser.new_page(viewport={"width": 1400, "height": 1000})
        browser.close()


def screenshot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / name), full_page=True)
    if os.environ.get("MEDCNN_SCREENSHOTS"):
        folder = Path(os.environ["MEDCNN_SCREENSHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / name, folder / name)


def test_experiment_opens_on_its_runs_with_distinct_names(ui, page, tmp_path):
    base, ids = ui
    page.goto(f"{base}/experiments/1?{ML}")
    names = page.locator("text=/phantom-small_cnn-[0-9a-f]{7}/")
    names.first.wait_for(timeout=60_000)
    assert names.count() == 2 and len(set(names.all_inner_texts())) == 2
    assert page.get_by_text("Traces", exact=True).count() <= 1  # not the GenAI overview
    screenshot(page, tmp_path, "mlflow-experiment.png")


def test_compare_view_shows_params_and_headline_metrics_first(ui, page, tmp_path):
    base, ids = ui
    page.goto(f"{base}/compare-runs?runs={urllib.parse.quote(json.dumps(ids))}&experiments=%5B%221%22%5D&{ML}")
    page.get_by_text("Run details").wait_for(timeout=60_000)
    page.get_by_text("train.lr", exact=True).first.wait_for(timeout=30_000)
    metrics = page.locator("text=/^(Headline\\.)?test\\.roc_auc$/")
    metrics.first.wait_for(timeout=30_000)  # the first rows of a 400-row table, without scrolling
    assert page.get_by_text("Headline.test.accuracy", exact=True).count() >= 1
    page.get_by_text("Show diff only").last.scroll_into_view_if_needed()
    screenshot(page, tmp_path, "mlflow-compare.png")


def test_per_epoch_curves_are_there(ui, page, tiny_run, tmp_path):
    base, ids = ui
    page.goto(f"{base}/experiments/1/runs/{ids[0]}/model-metrics?{ML}")
    search = page.get_by_placeholder("Search metric charts")
    search.wait_for(timeout=60_000)
    search.fill("epoch.")
    curves = [f"epoch.{c}" for c in train.HISTORY_COLUMNS[1:]]
    page.get_by_text(curves[0], exact=True).first.wait_for(timeout=30_000)
    page.wait_for_timeout(3000)  # let the charts draw before counting their lines
    for curve in curves:
        assert page.get_by_text(curve, exact=True).count() == 1, curve
    charts = page.locator(".js-plotly-plot")
    assert charts.count() >= len(curves) and page.locator(".js-plotly-plot path.js-line").count() >= len(curves)
    screenshot(page, tmp_path, "mlflow-curves.png")
