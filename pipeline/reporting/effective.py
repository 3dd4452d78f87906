"""Which params the run used, and how: the report's parameter table shows effective values.

A raw params table misleads: ``train.precision: bf16`` on a CPU run that trained in float32,
split fractions that the source's own splits overrode, an SVM baseline skipped for size. Each
rule below reads the params and the run's records and says, for a param (or every param under
a dotted prefix), what ran instead or why it played no part.
"""

from __future__ import annotations

from typing import Any

from pipeline.core.config import Params, as_dict, effective_loss, effective_train, flatten
from pipeline.data.privacy import public_params


def notes(params: Params, records: dict[str, Any]) -> dict[str, str]:
    """{dotted param or prefix: what ran, or why it played no part} for this run."""
    data, timing, ev = records["data"], records["train_timing"], records["eval"]
    source, cfg = params.data.source, params.train
    found: dict[str, str] = {}
    if params.data.task == "auto" and data.get("task"):
        found["data.task"] = f"{data['task']} (auto, from the data)"
    if source != "medmnist":
        for key in ("data.name", "data.size", "data.raw_dir"):
            found[key] = f"not used: data.source is {source}, not medmnist"
    if source in ("phantom", "medmnist"):
        found["data.path"] = f"not used: data.source is {source}"
    if source != "phantom":
        found["data.phantom"] = f"not used: data.source is {source}"
    if source != "csv":
        found["data.group_column"] = "not used: only CSV manifests have columns"
    if source not in ("folder", "csv"):
        found["data.on_error"] = found["data.pseudonym_salt"] = f"not used: data.source {source} reads no image files"
    if not data.get("dicom"):
        found["data.dicom"] = "not used: no DICOM file among the inputs"
    if not data["split_method"].startswith("grouped"):
        found["data.split"] = f"not used: {data['split_method']}"
    if len(data["image_size"]) != 3:
        found["data.spacing"] = "not used: images, not volumes"
    if params.balance.strategy != "smote":
        found["balance.smote_k_neighbors"] = f"not used: balance.strategy is {params.balance.strategy}"
    if cfg.optimizer != "sgd":
        found["train.momentum"] = f"not used: train.optimizer is {cfg.optimizer}"
    ran = effective_train(cfg, data.get("task"))
    for key in ("warmup_epochs", "grad_clip"):
        if getattr(cfg, key) == "auto":
            found[f"train.{key}"] = f"{getattr(ran, key)} (auto, for {cfg.norm} norm" + (
                ", DP-SGD clips per image)" if key == "grad_clip" and cfg.privacy.enabled else ")")
    loss = effective_loss(cfg.loss, data.get("task"))
    if cfg.loss != loss:
        found["train.loss"] = f"{loss} (auto, for a {data.get('task')} task)"
    if loss != "focal":
        found["train.focal_gamma"] = f"not used: train.loss is {loss}"
    if timing.get("precision") and timing["precision"] != cfg.precision:
        found["train.precision"] = f"not used: trained in {timing['precision']} on {timing.get('device', 'the CPU')}"
    if not cfg.privacy.enabled:
        for key in ("target_epsilon", "delta", "max_grad_norm", "accountant", "secure_mode"):
            found[f"train.privacy.{key}"] = "not used: train.privacy.enabled is false"
    if cfg.channels_last and len(data["image_size"]) == 3:
        found["train.channels_last"] = "not used: volumes keep their own layout"
    if ev["test"]["threshold"] is None:
        how = "grades, decided by the median grade" if ev.get("task") == "ordinal" else "multi-class, decided by arg-max"
        found["evaluate.positive_class"] = found["evaluate.threshold"] = f"not used: {how}"
    elif isinstance(ev["test"]["threshold"], list):
        found["evaluate.positive_class"] = "not used: multi-label, every finding is decided at its own threshold"
    skipped = ev.get("baselines_skipped", {})
    if skipped:
        ran = [name for name in params.evaluate.baselines if name not in skipped]
        found["evaluate.baselines"] = (f"ran: {', '.join(ran) or 'none'}; skipped: "
                                       + "; ".join(f"{name} ({why})" for name, why in skipped.items()))
    if not params.evaluate.corruptions:
        found["evaluate.severities"] = found["evaluate.robustness_images"] = "not used: evaluate.corruptions is empty"
    if records["explain"].get("localisation") is None:
        found["explain.localisation_images"] = "not used: the data carry no lesion masks"
    return found


def rows(params: Params, records: dict[str, Any]) -> list[list[Any]]:
    """[param, value, what ran] for every param, the salt hidden."""
    found = notes(params, records)

    def note(key: str) -> str:
        parts = key.split(".")
        return next((found[".".join(parts[:i])] for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in found), "")

    return [[key, value, note(key)] for key, value in public_params(flatten(as_dict(params))).items()]
