"""The two files training writes: the model checkpoint and the resumable training state.

- ``models/model.pt``: state_dict + network config (+ plain extras such as class names),
  loadable with ``torch.load(weights_only=True)``: no pickled Python objects.
- ``models/checkpoints/last.pt``: everything needed to continue an interrupted run (weights,
  optimiser, random generator, history, best weights), tagged with a fingerprint of the
  params and data so a checkpoint from another run is never resumed.

Both are written through an in-memory buffer: torch embeds the file name in the archive, so
writing to a temporary name and renaming would change the bytes from run to run.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.core.errors import PipelineError
from pipeline.core.files import write_bytes
from pipeline.modeling.networks import Classifier, Ensemble, ModelConfig, build_model

log = logging.getLogger(__name__)


def _save(path: str | Path, obj: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def save_checkpoint(path: str | Path, model: Classifier | Ensemble, extra: dict[str, Any]) -> None:
    """state_dict + config (+ plain ``extra``), loadable with ``torch.load(weights_only=True)``.
    An ensemble stores each member's config (``members``) and their temperatures."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    config = {"config": dataclasses.asdict(model.config)}
    if isinstance(model, Ensemble):
        config["members"] = [dataclasses.asdict(c) for c in model.configs]
    _save(path, {**config, "state_dict": state, **extra})


def load_checkpoint(path: str | Path) -> tuple[Classifier | Ensemble, dict[str, Any]]:
    """The model (a network, or the ensemble of a cross-validation) in eval mode and the
    checkpoint's other entries."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path}: model checkpoint not found (run the train stage first)") from None
    config = checkpoint.pop("config")
    members = checkpoint.pop("members", None)
    model = build_model(ModelConfig(**config)) if members is None else Ensemble(
        [build_model(ModelConfig(**c)) for c in members], [1.0] * len(members))
    model.load_state_dict(checkpoint.pop("state_dict"))
    model.eval()
    return model, checkpoint


def save_progress(path: Path, state: dict[str, Any]) -> None:
    _save(path, state)


def load_progress(path: Path, expected: str) -> dict[str, Any] | None:
    """The last epoch's checkpoint if it belongs to this very run (same params, seed, data), else None."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != expected:
        log.info("ignoring %s: it belongs to other params or data", path)
        return None
    return state
