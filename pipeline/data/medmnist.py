"""The official MedMNIST files by name and size: downloaded once, MD5-verified every time.

The checksums are the values the MedMNIST authors publish (see :mod:`pipeline.data.catalog`).
A file already in ``data.raw_dir`` with a wrong MD5 is reported and never overwritten; a
download goes to a temporary name and is kept only when its MD5 matches. Without network
access the error says where to place a file downloaded elsewhere.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.files import download_verified, file_digest
from pipeline.data import catalog

log = logging.getLogger(__name__)


def fetch_medmnist(name: str, size: int, raw_dir: Path, url_template: str = catalog.MEDMNIST_URL) -> Path:
    """The official MedMNIST file in ``raw_dir``: downloaded once, MD5-verified every time.

    A file already there with a wrong MD5 is an error (it is never deleted: it may be the
    user's); a download is written to a temporary name and kept only if its MD5 matches.
    """
    entry = catalog.medmnist(name)
    if entry is None:
        raise PipelineError(f"unknown MedMNIST dataset '{name}' (known: {', '.join(catalog.MEDMNIST_NAMES)})")
    expected = entry["md5"][size]
    target = raw_dir / catalog.medmnist_file(name, size)
    if target.exists():
        found = file_digest(target, "md5")
        if found != expected:
            raise PipelineError(f"{target}: MD5 {found} does not match the official {expected}; "
                                "the file is corrupt or not the official release (move it away to download again)")
        return target
    url = url_template.format(file=target.name)
    log.info("downloading %s", url)
    try:
        download_verified(url, target, "md5", expected)
    except OSError as exc:  # urllib.error.URLError is an OSError
        raise PipelineError(f"could not download {url} ({getattr(exc, 'reason', exc)}). Without network access, "
                            f"download {target.name} elsewhere and place it at {target} (MD5 {expected})") from None
    return target
