"""Multi-label tasks: any number of findings per image (chest X-ray findings, ChestMNIST).

One sigmoid output per finding; binary cross-entropy with each finding's positive weight
(the balance stage's ``class_weight``), unknown entries (-1) masked out of the loss and of
every metric; a temperature and a threshold per finding, chosen on validation and frozen.
Metrics per finding (ROC AUC, average precision, sensitivity and specificity at the frozen
threshold, with bootstrap CIs) and over findings: macro and micro ROC AUC, and MedMNIST's ACC
(the mean over findings of the accuracy at 0.5), so results compare with the MedMNIST v2 table.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.core.config import TrainParams
from pipeline.core.errors import PipelineError
from pipeline.core.files import rounded
from pipeline.data.labels import UNKNOWN
from pipeline.evaluation.metrics import average_precision, binary_auc, choose_threshold, confusion_matrix
from pipeline.tasks.base import Task


def _entry_weights(labels: torch.Tensor | np.ndarray, weights: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Per image, the mean over its assessed findings of each entry's weight (positive weight
    where present, 1 where absent); 0 for an image with no assessed finding."""
    known = labels != UNKNOWN
    weight = (labels == 1) * weights + (labels == 0) * 1.0
    return (weight * known).sum(1) / known.sum(1).clip(min=1)


class MaskedBCE(nn.Module):
    """Per image: the mean, over its assessed findings, of BCE-with-logits with positive weights;
    an image with no assessed finding contributes 0."""

    def __init__(self, pos_weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", pos_weight)  # named as the other losses' weights

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        known = (target != UNKNOWN).to(logits.dtype)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, target.clamp(min=0).to(logits.dtype),
                                                              pos_weight=self.weight, reduction="none")
        return (loss * known).sum(dim=1) / known.sum(dim=1).clamp(min=1)


def expit(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1.0 - p))


def _known(labels: np.ndarray, c: int) -> np.ndarray:
    return labels[:, c] != UNKNOWN


def macro_auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """Mean ROC AUC over the findings that are both present and absent among their assessed images."""
    aucs = [binary_auc(labels[k, c] == 1, probs[k, c]) for c in range(labels.shape[1])
            for k in [_known(labels, c)]]
    aucs = [a for a in aucs if a is not None]
    return float(np.mean(aucs)) if aucs else None


def micro_auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """ROC AUC of every assessed (image, finding) pair pooled."""
    known = labels != UNKNOWN
    return binary_auc(labels[known] == 1, probs[known])


def medmnist_accuracy(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """MedMNIST v2's ACC for multi-label sets: the mean over findings of the accuracy at 0.5."""
    scores = [float(((probs[k, c] > 0.5) == (labels[k, c] == 1)).mean()) for c in range(labels.shape[1])
              for k in [_known(labels, c)] if k.any()]
    return float(np.mean(scores)) if scores else None


class MultiLabel(Task):
    family = "multioutput"

    def check(self, cfg: TrainParams) -> None:
        if cfg.loss != "cross_entropy":
            raise PipelineError(f"train.loss={cfg.loss} does not apply to multi-label data: it trains with binary "
                                "cross-entropy per finding (train.loss: cross_entropy)")
        if cfg.label_smoothing:
            raise PipelineError("train.label_smoothing is for one class per image; multi-label training takes 0")

    def loss(self, cfg: TrainParams, weights: torch.Tensor) -> nn.Module:
        return MaskedBCE(weights)

    def batch_weight(self, weights: torch.Tensor, labels: torch.Tensor) -> float:
        """The batch's total weight: per image, the mean weight of its assessed entries (a present
        finding weighs its positive weight, an absent one 1), so the batch loss is a weighted mean
        and a model that knows nothing scores ln 2, as cross-entropy scores ln K."""
        return float(_entry_weights(labels, weights).sum())

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)

    def chance_labels(self) -> np.ndarray:
        return np.zeros((1, self.k), dtype=np.int64)

    def validation_loss(self, labels: np.ndarray, probs: np.ndarray, weights: list[float]) -> float:
        """The training loss on validation: positive-weighted BCE over assessed findings, per image,
        over the images' total weight (:meth:`batch_weight`)."""
        p = np.clip(probs, 1e-12, 1 - 1e-12)
        known = labels != UNKNOWN
        loss = -(np.asarray(weights) * (labels == 1) * np.log(p) + (labels == 0) * np.log(1 - p))
        per_image = (loss * known).sum(axis=1) / np.maximum(known.sum(axis=1), 1)
        return float(per_image.sum() / _entry_weights(labels, np.asarray(weights)).sum())

    def epoch_scores(self, labels: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
        return {"accuracy": medmnist_accuracy(labels, probs), "roc_auc": macro_auc(labels, probs)}

    def fit_temperature(self, method: str, labels: np.ndarray, raw: np.ndarray) -> list[float]:
        """One temperature per finding minimising its validation BCE (1 each with ``calibrate: none``)."""
        from scipy.optimize import minimize_scalar  # scipy: loaded by evaluate, never by train

        if method == "none":
            return [1.0] * self.k
        temperatures = []
        for c in range(self.k):
            known = _known(labels, c)
            y, z = labels[known, c] == 1, logit(np.clip(raw[known, c], 1e-12, 1 - 1e-12))

            def nll(log_t: float, y: np.ndarray = y, z: np.ndarray = z) -> float:
                p = np.clip(expit(z / np.exp(log_t)), 1e-12, 1 - 1e-12)
                return float(-(y * np.log(p) + (~y) * np.log(1 - p)).mean())

            result = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded",
                                     options={"xatol": 1e-6})
            temperatures.append(rounded(float(np.exp(result.x))))
        return temperatures

    def calibrate(self, raw: np.ndarray, temperature: list[float]) -> np.ndarray:
        return expit(logit(np.clip(raw, 1e-12, 1 - 1e-12)) / np.asarray(temperature))

    def thresholds(self, rule: str, labels: np.ndarray, probs: np.ndarray, positive: int) -> list[float]:
        """Each finding's threshold by ``evaluate.threshold`` on its assessed validation images."""
        out = []
        for c in range(self.k):
            known = _known(labels, c)
            p = probs[known, c]
            out.append(rounded(choose_threshold(rule, (labels[known, c] == 1).astype(np.int64),
                                                np.column_stack([1 - p, p]), 1)))
        return out

    def decide(self, probs: np.ndarray, threshold: list[float], positive: int) -> np.ndarray:
        return (probs >= np.asarray(threshold)).astype(np.int64)

    def graph(self, logits: torch.Tensor, temperature: torch.Tensor, threshold: torch.Tensor | None, positive: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.sigmoid(logits / temperature)  # sigmoid(logit(sigmoid(z)) / T) = sigmoid(z / T)
        return probs, (probs >= threshold).to(torch.int64)

    def threshold_rule(self, rule: str, threshold: Any) -> str:
        return f"{rule}, per finding"

    def describe(self, decision: Any) -> str:
        """The findings decided present, joined by ``|`` (the manifest's notation), or ``none``."""
        return "|".join(n for n, d in zip(self.names, decision) if d) or "none"

    def headline(self, labels: np.ndarray, probs: np.ndarray, threshold: Any, positive: int) -> dict[str, Any]:
        return {"roc_auc": macro_auc(labels, probs), "accuracy": medmnist_accuracy(labels, probs)}

    def metrics(self, labels: np.ndarray, probs: np.ndarray, threshold: list[float]
                ) -> dict[str | tuple[str, str], float | None]:
        """(finding, metric) per finding, then the metrics over findings by name."""
        decisions = self.decide(probs, threshold, 1)
        out: dict[str, float | None] = {}
        for c, name in enumerate(self.names):
            known = _known(labels, c)
            y, p, d = labels[known, c] == 1, probs[known, c], decisions[known, c] == 1
            positives, negatives = int(y.sum()), int((~y).sum())
            out.update({(name, "n"): int(known.sum()), (name, "positives"): positives,
                        (name, "roc_auc"): binary_auc(y, p), (name, "average_precision"): average_precision(y, p),
                        (name, "sensitivity"): float((d & y).sum() / positives) if positives else None,
                        (name, "specificity"): float((~d & ~y).sum() / negatives) if negatives else None})
        out.update({"roc_auc": macro_auc(labels, probs), "roc_auc_micro": micro_auc(labels, probs),
                    "accuracy": medmnist_accuracy(labels, probs),
                    "exact_match": float((decisions == np.where(labels == UNKNOWN, decisions, labels)).all(1).mean())})
        return out

    def describe_label(self, label: Any) -> str:
        """The findings present (an unknown one is listed with ``?``)."""
        return "|".join(n + ("?" if v == UNKNOWN else "") for n, v in zip(self.names, label) if v != 0) or "none"

    def failures(self, labels: np.ndarray, probs: np.ndarray, decisions: np.ndarray, ids: np.ndarray, k: int
                 ) -> dict[str, list[dict[str, Any]]]:
        """The most confident false positives and false negatives over (image, finding) pairs."""
        def rows(where: np.ndarray, worst_first: np.ndarray) -> list[dict[str, Any]]:
            pairs = np.argwhere(where)
            order = np.argsort(worst_first[where], kind="stable")[:k]
            return [{"index": int(i), "id": str(ids[i]), "finding": self.names[c], "output": int(c),
                     "label": self.describe_label(labels[i]), "predicted": self.describe(decisions[i]),
                     "score": rounded(float(probs[i, c]))} for i, c in pairs[order]]

        return {"false_positives": rows((labels == 0) & (decisions == 1), -probs),
                "false_negatives": rows((labels == 1) & (decisions == 0), probs)}

    def baseline_problems(self, labels: np.ndarray, weights: np.ndarray, val_labels: np.ndarray
                          ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int | None]]:
        """One-vs-rest: one binary problem per finding, on the images where it was assessed, a
        present finding weighted by its positive weight."""
        problems = []
        for c in range(self.k):
            rows, val_rows = np.flatnonzero(_known(labels, c)), np.flatnonzero(_known(val_labels, c))
            y = labels[rows, c]
            problems.append((rows, y, np.where(y == 1, weights[c], 1.0), val_rows, val_labels[val_rows, c], c))
        return problems

    def membership_view(self, probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each image as one binary prediction of its whole label: the probability the model gives
        its true findings (the geometric mean over assessed findings of P(the true answer)), class 1."""
        known = labels != UNKNOWN
        right = np.log(np.clip(np.where(labels == 1, probs, 1 - probs), 1e-12, 1.0))
        p = np.exp((right * known).sum(axis=1) / np.maximum(known.sum(axis=1), 1))
        return np.column_stack([1 - p, p]), np.ones(len(labels), dtype=np.int64)

    def outcome_order(self, positive: int | None) -> list[str]:
        return [f"{name}: {kind}" for name in self.names for kind in ("found", "missed", "false alarm")]

    def explain_units(self, labels: np.ndarray, decisions: np.ndarray, positive: int | None, outputs: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per finding k, the images where it was found, missed or falsely called; each explained
        by finding k's own output, so an image with two findings has a map for each."""
        index, kinds, targets = [], [], []
        for c, name in enumerate(self.names):
            y, d = labels[:, c], decisions[:, c]
            for kind, where in (("found", (y == 1) & (d == 1)), ("missed", (y == 1) & (d == 0)),
                                ("false alarm", (y == 0) & (d == 1))):
                rows = np.flatnonzero(where)
                index.append(rows)
                kinds.append(np.full(len(rows), f"{name}: {kind}", dtype=object))
                targets.append(np.full(len(rows), c))
        return np.concatenate(index), np.concatenate(kinds), np.concatenate(targets).astype(np.int64)

    def overlay_outputs(self, probs: np.ndarray, decisions: np.ndarray, outputs: int) -> np.ndarray:
        return probs.argmax(axis=1)  # the most probable finding

    def localisation_units(self, labels: np.ndarray, positive: int, outputs: int
                           ) -> list[tuple[str, np.ndarray, np.ndarray, int | None]]:
        """Each finding's map on the images that have it, against that finding's mask (value k + 1)."""
        return [(name, labels[:, c] == 1, np.full(len(labels), c), c + 1) for c, name in enumerate(self.names)]

    def confusions(self, labels: np.ndarray, decisions: np.ndarray) -> list[tuple[str, list[list[int]], list[str]]]:
        """Each finding's 2×2 matrix over the images where it was assessed."""
        return [(name, confusion_matrix(labels[known, c], decisions[known, c], 2), ["absent", "present"])
                for c, name in enumerate(self.names) for known in [_known(labels, c)]]

    def curves(self, labels: np.ndarray, probs: np.ndarray, positive: int
               ) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """Each finding's ROC and PR curve over its assessed images."""
        return [(name, labels[known, c] == 1, probs[known, c]) for c, name in enumerate(self.names)
                for known in [_known(labels, c)] if len(np.unique(labels[known, c])) == 2]

    def calibration_pairs(self, labels: np.ndarray, probs: np.ndarray, positive: int
                          ) -> tuple[np.ndarray, np.ndarray, int]:
        """Every assessed (image, finding) pair as a binary prediction: P(present) against presence."""
        known = labels != UNKNOWN
        p = probs[known]
        return (labels[known] == 1).astype(np.int64), np.column_stack([1 - p, p]), 1

    def prediction_columns(self, labels: np.ndarray, probs: np.ndarray, raw: np.ndarray, decisions: np.ndarray
                           ) -> tuple[list[str], list[list[Any]]]:
        names = self.names
        # "label" and "prediction" name the findings (| between them), for DVC's confusion plot
        header = ["label", "prediction", *[f"label_{n}" for n in names], *[f"prob_{n}" for n in names],
                  *[f"uncalibrated_prob_{n}" for n in names], *[f"prediction_{n}" for n in names]]
        rows = [[self.describe(y == 1), self.describe(d), *map(int, y), *[f"{v:.6f}" for v in p],
                 *[f"{v:.6f}" for v in r], *map(int, d)] for y, p, r, d in zip(labels, probs, raw, decisions)]
        return header, rows
