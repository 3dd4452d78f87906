"""Start training from pretrained weights: ``train.pretrained``.

``weights`` is a local file or a URL. A URL is fetched once into the weights cache
(``$MEDCNN_CACHE``, default ``~/.cache/medcnn``), under its sha256, which must be given and is
checked on every use; a local file's sha256 is recorded, and checked when given. The file holds
a ``state_dict`` (or a checkpoint with one under ``state_dict``, such as another run's
``models/network.pt``) in the network's own layout: medcnn's, or the MONAI network's without
medcnn's wrapper prefix. Every tensor whose name and shape match is loaded; the rest (a small-image
stem, a classifier head for another number of classes) keep their random initialisation. What
was loaded, from what, and what the weights were pretrained on (``source``) go into the
model package and the report.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.config import PretrainedParams
from pipeline.core.errors import PipelineError
from pipeline.core.files import download_verified, file_digest

# medcnn wraps every network in a Classifier (".net") and MONAI's in a MonaiNet (".net.net").
PREFIXES = ("", "net.", "net.net.")


def cache_dir() -> Path:
    return Path(os.environ.get("MEDCNN_CACHE") or Path.home() / ".cache" / "medcnn") / "weights"


def resolve(cfg: PretrainedParams) -> tuple[Path, str]:
    """The weights file on disk and its sha256: a local file as given (checked against ``sha256``
    when it is given), a URL fetched once into the cache and checked against ``sha256``."""
    assert cfg.weights
    if cfg.is_url:
        path = cache_dir() / f"{cfg.sha256}-{Path(cfg.weights.split('?')[0]).name or 'weights.pt'}"
        if not path.exists():
            try:
                download_verified(cfg.weights, path, "sha256", str(cfg.sha256))
            except OSError as exc:  # urllib.error.URLError is an OSError
                raise PipelineError(f"train.pretrained.weights {cfg.weights}: cannot fetch "
                                    f"({getattr(exc, 'reason', exc)})") from None
    else:
        path = Path(cfg.weights)
        if not path.is_file():
            raise PipelineError(f"train.pretrained.weights {path}: file not found")
    found = file_digest(path, "sha256")  # a cached copy too: it is checked on every use
    if cfg.sha256 and found != cfg.sha256:  # a changed cached copy is reported, never replaced
        raise PipelineError(f"{path}: sha256 {found}, but train.pretrained.sha256 is {cfg.sha256}"
                            + (" (the cached copy changed: move it away to fetch it again)" if cfg.is_url else ""))
    return path, found


def load(network: nn.Module, cfg: PretrainedParams) -> dict[str, Any]:
    """Copy the matching tensors of ``cfg.weights`` into ``network``; returns what was loaded."""
    path, sha256 = resolve(cfg)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise PipelineError(f"{path}: not a PyTorch weights file ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PipelineError(f"{path}: expected a state_dict (names → tensors)")
    own = network.state_dict()
    loaded, skipped = {}, []
    for name, tensor in own.items():
        if name in ("mean", "std"):  # the standardisation of this run's training images
            continue
        match = next((state[key] for key in _candidates(name) if key in state), None)
        if match is not None and match.shape == tensor.shape:
            loaded[name] = match.to(tensor.dtype)
        else:
            skipped.append(name)
    if not loaded:
        raise PipelineError(f"{path}: none of its {len(state)} tensors matches the network's names and shapes "
                            f"(its first: {', '.join(list(state)[:3])}; the network's: {', '.join(list(own)[2:5])})")
    network.load_state_dict(loaded, strict=False)
    return {"file": path.name, "sha256": sha256, "source": cfg.source,
            "loaded": len(loaded), "tensors": len(own) - 2, "not_loaded": skipped}


def _candidates(name: str) -> list[str]:
    """The names a tensor of the network may have in a weights file: with or without the wrappers."""
    bare = name.removeprefix("net.").removeprefix("net.")
    return [name, *(p + bare for p in PREFIXES)]
