"""Pseudonymisation: no patient identifier ever reaches an output.

Patient ids are replaced by a salted SHA-256 (``p-`` + 16 hex digits) before anything is
saved; image ids are salted hashes of the file's relative path, because file names often
carry names or record numbers. The salt is ``data.pseudonym_salt`` or, when that is empty,
the environment variable ``MEDCNN_PSEUDONYM_SALT``; it is never written anywhere (the
track stage and the report redact it). The same salt gives the same pseudonyms, so runs stay
reproducible; the data owner, who holds the salt, can map them back.
"""

from __future__ import annotations

import hashlib
import os

SALT_ENV = "MEDCNN_PSEUDONYM_SALT"
REDACTED = "***"


def resolve_salt(param: str) -> str:
    return param or os.environ.get(SALT_ENV, "")


def pseudonym(value: str, salt: str, prefix: str = "p-") -> str:
    return prefix + hashlib.sha256(f"{salt}\x00{value}".encode()).hexdigest()[:16]


def redact(text: str, salt: str) -> str:
    """``text`` with the salt replaced, for params.yaml and dvc.lock copies that leave the machine."""
    return text.replace(salt, REDACTED) if salt else text


def public_params(flat: dict) -> dict:
    """Dotted params with the salt value hidden (it would let anyone reverse the pseudonyms)."""
    return {k: (REDACTED if k == "data.pseudonym_salt" and v else v) for k, v in flat.items()}
