"""The kinds of label a study has, as arrays: which task the data are, and their counts.

- **binary** and **multiclass**: one class index per image (``labels``: N int64, 0..K-1);
- **multilabel**: one column per finding (``labels``: N×L int64 of 1 present, 0 absent and
  ``UNKNOWN`` = -1 where the finding was not assessed, as CheXpert and TorchXRayVision mark
  partial labels); every loss and metric leaves the unknown entries out;
- **ordinal**: one grade per image (N int64, 0..K-1), whose order matters (diabetic
  retinopathy, Gleason, Kellgren-Lawrence, BI-RADS).

``data.task: auto`` reads the task from the data: a label matrix is multi-label, a dataset
the catalog knows as graded is ordinal, two classes are binary, more are multi-class. Only
numpy here: ``prepare`` decides the task before torch is ever loaded.
"""

from __future__ import annotations

import numpy as np

from pipeline.core.errors import PipelineError

UNKNOWN = -1
SINGLE_LABEL = ("binary", "multiclass")


def is_matrix(labels: np.ndarray) -> bool:
    """Labels with one column per finding (multi-label), as opposed to one index per image."""
    return labels.ndim == 2


def detect(requested: str, train_labels: np.ndarray, num_classes: int, known: str | None, source: str) -> str:
    """The task of the data: ``requested`` checked against the labels' shape, or (``auto``)
    read from them and from the catalog's ``known`` task of a named dataset."""
    matrix = is_matrix(train_labels)
    if requested == "auto":
        if matrix:
            return "multilabel"
        if known == "ordinal":
            return "ordinal"
        return "binary" if num_classes == 2 else "multiclass"
    if requested == "multilabel" and not matrix:
        raise PipelineError(f"{source}: data.task is multilabel but the labels are one class per image; "
                            "multi-label data have one 0/1 column per finding")
    if requested != "multilabel" and matrix:
        raise PipelineError(f"{source}: the labels have one column per finding (multi-label) but data.task is "
                            f"{requested}; use data.task: multilabel or auto")
    if requested == "binary" and num_classes != 2:
        raise PipelineError(f"{source}: data.task is binary but the data have {num_classes} classes")
    if requested == "ordinal" and num_classes < 3:
        raise PipelineError(f"{source}: data.task is ordinal but the data have {num_classes} grades; "
                            "ordinal tasks need at least 3 (two grades are a binary task)")
    return requested


def check_matrix(splits: dict[str, dict[str, np.ndarray]], names: tuple[str, ...], source: str) -> list[str]:
    """Check multi-label matrices (values 1, 0 or -1; the same number of columns in every split;
    every finding present and absent at least once in training) and return the finding names."""
    widths = {split: data["labels"].shape[1] if is_matrix(data["labels"]) else "one label per image"
              for split, data in splits.items()}
    if len(set(widths.values())) != 1:
        raise PipelineError(f"{source}: splits have different numbers of label columns {widths}")
    width = widths["train"]
    if names and len(names) != width:
        raise PipelineError(f"{source}: data.class_names names {len(names)} findings but the labels have {width} columns")
    for split, data in splits.items():
        bad = np.argwhere(~np.isin(data["labels"], (0, 1, UNKNOWN)))
        if bad.size:
            row, column = bad[0]
            raise PipelineError(f"{source}: {split} labels must be 1 (present), 0 (absent) or -1 (unknown): "
                                f"{len(bad)} entries are not (first at image {row}, column {column}: "
                                f"{data['labels'][row, column]})")
    train = splits["train"]["labels"]
    never = [str(c) for c in range(width) if not (train[:, c] == 1).any() or not (train[:, c] == 0).any()]
    if never:
        raise PipelineError(f"{source}: finding column(s) {', '.join(never)} are never both present and absent in "
                            "the training split: nothing to learn")
    return list(names) if names else [str(i) for i in range(width)]


def counts(labels: np.ndarray, names: list[str]) -> dict[str, int]:
    """Images per class or grade; for multi-label data, images with each finding present."""
    if is_matrix(labels):
        return {name: int((labels[:, c] == 1).sum()) for c, name in enumerate(names)}
    return dict(zip(names, map(int, np.bincount(labels, minlength=len(names)))))


def unknown(labels: np.ndarray, names: list[str]) -> dict[str, int] | None:
    """Multi-label data: images whose finding was not assessed, per finding (None otherwise)."""
    if not is_matrix(labels):
        return None
    return {name: int((labels[:, c] == UNKNOWN).sum()) for c, name in enumerate(names)}


def strata(labels: np.ndarray) -> np.ndarray:
    """One stratum per image for stratified splitting: the class or grade, or for multi-label
    data the number of findings present (0, 1, 2, …), which keeps the prevalence of findings
    alike across splits without one stratum per combination."""
    return (labels == 1).sum(axis=1) if is_matrix(labels) else labels
