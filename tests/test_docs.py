"""The front door: the documentation builds without a dead link, the README stays short, no page
quotes a default that params.yaml does not have or speaks of the project's own history, and the
citation metadata are valid."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import flatten
from tests.conftest import REPO, need_service

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# `section.key: value` in backticks states a default; `-S section.key=value` is an override.
DEFAULT = re.compile(r"`([a-z_]+(?:\.[a-z_0-9]+)+): ([^`]+)`")
# Words about how the project came to be, which a user has no use for.
HISTORY = re.compile(r"\bissue \d+|\bthis stop\b|\bat this stop\b|\blent (machine|GPU)\b|\bthe previous defaults?\b|"
                     r"\bthe defaults before\b|\bcommit [0-9a-f]{7,}\b|--compare [0-9a-f]{7,}|--baseline [0-9a-f]{7,}",
                     re.IGNORECASE)


def params() -> dict:
    return flatten(yaml.safe_load((REPO / "params.yaml").read_text()))


def test_mkdocs_builds_strictly_offline(tmp_path):
    mkdocs = Path(sys.executable).parent / "mkdocs"
    need_service(mkdocs.exists(), "MkDocs (make setup installs it)")
    done = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    index = (tmp_path / "site" / "index.html").read_text()
    assert "fonts.googleapis.com" not in index  # the theme fetches no web font
    assert (tmp_path / "site" / "reproducibility" / "index.html").is_file()


def test_readme_is_a_five_minute_read():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in re.findall(r"\]\((docs/[a-z-]+\.md)", readme):
        assert (REPO / page).is_file(), page
    assert (REPO / "CHANGELOG.md").resolve() == (REPO / "docs" / "changelog.md").resolve()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_quoted_defaults_are_the_params_defaults(page):
    values = params()
    for key, text in DEFAULT.findall(page.read_text()):
        if key in values:
            assert yaml.safe_load(text) == values[key], f"{page.name}: `{key}: {text}` but params.yaml has {values[key]!r}"


def test_the_default_check_catches_a_wrong_default(tmp_path):
    wrong = "Train for `train.epochs: 25`; the default `train.patience: 5`."
    values = params()
    mismatched = [key for key, text in DEFAULT.findall(wrong) if yaml.safe_load(text) != values[key]]
    assert mismatched == ["train.epochs"]


READ_BY_USERS = [*PAGES, *sorted((REPO / "pipeline").rglob("*.py")), *sorted((REPO / "bench").glob("*.py")),
                 *sorted((REPO / "pipeline" / "reporting" / "templates").glob("*.j2")),
                 *[REPO / name for name in ("params.yaml", "dvc.yaml", "Makefile", "scripts/mlflow-server.sh")]]


@pytest.mark.parametrize("page", READ_BY_USERS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_page_speaks_of_the_projects_history(page):
    lines = [line for line in page.read_text().splitlines() if not line.startswith("Measured ")]
    found = [line.strip() for line in lines if HISTORY.search(line)]
    assert not found, found


def test_citation_metadata_are_valid_cff():
    cffconvert = Path(sys.executable).parent / "cffconvert"
    need_service(cffconvert.exists() or shutil.which("cffconvert") is not None, "cffconvert (make setup installs it)")
    done = subprocess.run([str(cffconvert), "--validate", "-i", str(REPO / "CITATION.cff")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
