"""The source stage: the input's fingerprint changes exactly when prepare would read something else."""

from __future__ import annotations

import os

import numpy as np

from pipeline import source
from pipeline.core.files import read_json
from tests.conftest import tiny_params


def stamp(tmp_path, **overrides):
    return source.fingerprint(tiny_params(tmp_path, **overrides).data)


def test_a_replaced_added_or_removed_file_changes_the_fingerprint(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    for name in ("a/1.png", "a/2.png", "b/3.png"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x" * 10)
    monkeypatch.setenv("MEDCNN_PSEUDONYM_SALT", "s1")
    on = {"data.source": "folder", "data.path": str(folder)}
    first = stamp(tmp_path, **on)
    assert first["files"] == 3 and first == stamp(tmp_path, **on)  # nothing changed: same bytes
    (folder / ".DS_Store").write_bytes(b"junk")
    assert stamp(tmp_path, **on) == first  # hidden files are not inputs
    (folder / "a/2.png").write_bytes(b"y" * 10)  # replaced: same size, new modification time
    os.utime(folder / "a/2.png", ns=(1, 1))
    replaced = stamp(tmp_path, **on)
    assert replaced != first
    (folder / "b/4.png").write_bytes(b"z")
    added = stamp(tmp_path, **on)
    assert added["files"] == 4 and added != replaced
    (folder / "b/4.png").unlink()
    assert stamp(tmp_path, **on) == replaced
    monkeypatch.setenv("MEDCNN_PSEUDONYM_SALT", "s2")  # every pseudonym changes: prepare must rerun
    assert stamp(tmp_path, **on) != replaced


def test_manifest_rows_npz_phantom_and_what_is_written(tmp_path):
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans/1.dcm").write_bytes(b"1")
    series = tmp_path / "scans/series"
    series.mkdir()
    (series / "s1.dcm").write_bytes(b"2")
    (tmp_path / "m.csv").write_text("path,label\nscans/1.dcm,a\nscans/series,b\nscans/gone.dcm,a\n")
    found = stamp(tmp_path, **{"data.source": "csv", "data.path": str(tmp_path / "m.csv")})
    assert found["files"] == 3  # the manifest, the file and the series' slice; the missing one as absent
    (series / "s2.dcm").write_bytes(b"3")
    assert stamp(tmp_path, **{"data.source": "csv", "data.path": str(tmp_path / "m.csv")}) != found
    np.savez(tmp_path / "d.npz", x=np.zeros(3))
    assert stamp(tmp_path, **{"data.source": "npz", "data.path": str(tmp_path / "d.npz")})["files"] == 1
    assert stamp(tmp_path)["files"] == 0  # the phantom: params say it all
    params = tiny_params(tmp_path, **{"data.source": "folder", "data.path": str(tmp_path / "scans")})
    source.run(params, tmp_path / "source.json")
    written = (tmp_path / "source.json").read_text()
    assert read_json(tmp_path / "source.json")["files"] == 3 and "1.dcm" not in written and "scans" not in written
