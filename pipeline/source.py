"""Stage 0, source: a fingerprint of the input prepare reads, so prepare reruns exactly when it changed.

The input (an ``.npz``, a MedMNIST download, an image folder, a CSV manifest and the files it
names) is named by a param, and ``dvc.yaml`` cannot list a param's value as a dependency.
This stage always runs, and it is cheap: it records every input file's path (relative to
the input), size and modification time, the way DVC's own state database notices changes,
without reading any content, in ``data/source.json``. ``prepare`` depends on that file:
when nothing changed its bytes are the same and DVC skips ``prepare`` and everything after
it; a replaced, added or removed file changes it, and ``prepare`` reruns (and checks
content itself: the summary's digests). The phantom is generated from params, which DVC
already tracks, so its fingerprint is constant. File names are hashed, never written: a
name may carry a patient's name. The pseudonym salt (``$MEDCNN_PSEUDONYM_SALT``), which
changes every pseudonym prepare writes, enters as a slow key derivation (PBKDF2, 200,000
rounds), never as itself.

The external validation sites (``evaluate.external``) are fingerprinted the same way into
``data/external.json``, on which evaluate alone depends: a changed site reruns evaluate and
what follows it, never prepare or train.

A MedMNIST dataset's first run downloads the file, so the next ``dvc repro`` finds it new and
reruns ``prepare`` once more (same bytes, nothing after it reruns).
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import Any

from pipeline.core import paths
from pipeline.core.config import DataParams, Params
from pipeline.core.files import write_json
from pipeline.core.runtime import stage_main
from pipeline.data.privacy import resolve_salt


def files_of(data: DataParams) -> list[Path]:
    """Every file prepare may read for ``data``, in a stable order (absent ones included)."""
    if data.source == "phantom":
        return []
    if data.source == "medmnist":
        from pipeline.data import catalog

        return [Path(data.raw_dir) / catalog.medmnist_file(data.name, data.size)]
    root = Path(data.path)
    if data.source == "npz" or not root.exists():
        return [root]
    if data.source == "csv":
        with open(root, newline="", encoding="utf-8-sig") as handle:
            named = [row.get("path", "").strip() for row in csv.DictReader(handle)]
        listed = [root]
        for rel in named:
            target = root.parent / rel
            listed += sorted(_walk(target)) if target.is_dir() else [target]  # a DICOM series folder
        return listed
    return sorted(_walk(root))


def _walk(root: Path) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder) / name for name in files if not name.startswith(".")]
    return found


def fingerprint(data: DataParams) -> dict[str, Any]:
    """The input's identity as DVC would see it: (path, size, mtime) per file, hashed; and the salt's."""
    salt = resolve_salt(data.pseudonym_salt)
    digest = hashlib.sha256(hashlib.pbkdf2_hmac("sha256", salt.encode(), b"medcnn-source", 200_000) if salt else b"")
    count = 0
    for file in files_of(data):
        try:
            stat = file.stat()
            digest.update(f"{file}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
            count += 1
        except OSError:
            digest.update(f"{file}\tabsent\n".encode())  # prepare reports it; appearing later reruns it
    return {"source": data.source, "files": count, "stat_sha256": digest.hexdigest()}


def run(params: Params, out: Path = paths.SOURCE, external_out: Path = paths.EXTERNAL_SOURCE) -> dict[str, Any]:
    """Write the input's fingerprint to ``out``, and each external validation site's
    (``evaluate.external``, read by evaluate alone) to ``external_out``."""
    found = fingerprint(params.data)
    write_json(out, found)
    write_json(external_out, {site.name: fingerprint(site.applied_to(params.data)) for site in params.evaluate.external})
    return found


def main() -> None:
    stage_main(__doc__.splitlines()[0], run)


if __name__ == "__main__":
    main()
