"""Atomic file writes, checksums, and how floats are rounded when written and shown.

Every stage writes through these helpers: data go to a temporary file or folder beside the
target and are renamed into place only when complete, so an interrupted or failing stage
never leaves a half-written output behind. Every written metric is rounded by
:func:`rounded`, so equal runs give equal bytes and no file carries noise digits.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import PipelineError


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    """Stable JSON: sorted keys and fixed indentation, so equal content gives equal bytes."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_csv(path: str | Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def save_npy(path: str | Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    write_bytes(path, buffer.getvalue())


def load_npy(path: str | Path, mmap: bool = False) -> np.ndarray:
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


@contextlib.contextmanager
def staged_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces ``target`` only if the block succeeds.

    On any exception the temporary folder is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


DECIMALS = 6  # digits every written metric keeps
SECONDS_DECIMALS = 2  # wall times (timing.json): noise beyond 10 ms


def rounded(value: Any, digits: int = DECIMALS) -> Any:
    """A float rounded for writing (``DECIMALS`` digits unless told), always a plain Python float (a
    numpy scalar would need pickle in a checkpoint); other values unchanged."""
    return round(float(value), digits) if isinstance(value, float) else value


def fmt(value: Any) -> str:
    """How every number appears to a reader (report, warnings): 4 significant digits, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks (``md5`` for MedMNIST's published checksums)."""
    digest = hashlib.new(algorithm, usedforsecurity=False)  # integrity checks, not signatures
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_verified(url: str, target: Path, algorithm: str, expected: str) -> None:
    """Download ``url`` to ``target``, kept only when its ``algorithm`` digest is ``expected``.

    The bytes go to a temporary file beside ``target`` and replace it in one rename, so a failed,
    interrupted or corrupt download leaves nothing behind. A digest mismatch is a
    :class:`PipelineError` naming the URL; network and disk errors (``OSError``, which
    ``urllib.error.URLError`` is) propagate for the caller to word for its user.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out, 1 << 20)
        found = file_digest(tmp, algorithm)
        if found != expected:
            raise PipelineError(f"{url}: downloaded file has {algorithm} {found}, expected {expected}; not kept")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def digest_tree(root: str | Path) -> dict[str, str]:
    """sha256 of every file under ``root``, keyed by its path relative to ``root``."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): file_digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def digests_sha256(digests: dict[str, str]) -> str:
    """One sha256 of a folder's :func:`digest_tree` (its files' names and contents): how a set of
    prepared arrays is named in ``meta.json``, the metrics and MLflow."""
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


class NpyWriter:
    """Append rows to a ``.npy`` file one at a time, without holding the array in memory.

    Rows go to a raw side file; :meth:`close` writes the final file (same bytes as
    ``np.save``) by streaming them behind the header, so peak memory is one chunk, not the
    array. Used inside a :func:`staged_dir`, which removes everything on failure.
    """

    CHUNK = 1 << 24

    def __init__(self, path: Path, dtype: np.dtype, row_shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.row_shape, self.rows = Path(path), np.dtype(dtype), tuple(row_shape), 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._raw = open(self.path.with_suffix(".raw"), "wb")

    def append(self, row: np.ndarray) -> None:
        if row.shape != self.row_shape or row.dtype != self.dtype:
            raise ValueError(f"row {row.shape} {row.dtype} does not fit {self.row_shape} {self.dtype}")
        self._raw.write(np.ascontiguousarray(row).tobytes())
        self.rows += 1

    def close(self) -> None:
        raw_path = Path(self._raw.name)
        self._raw.close()
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.rows, *self.row_shape)}
        with open(self.path, "wb") as out, open(raw_path, "rb") as raw:
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(raw, out, self.CHUNK)
        raw_path.unlink()
