"""The interface every task implements (see :mod:`pipeline.tasks`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.core.config import TrainParams
from pipeline.evaluation.metrics import confusion_matrix
from pipeline.modeling.recipe import make_loss


def outcome_name(name: str, correct: bool) -> str:
    return f"{'correctly classified' if correct else 'misclassified'} {name} image"


class Task:
    """What one kind of label needs from training, evaluation, explanation and prediction.

    ``names`` are the classes, findings or grades; ``k`` their number. Probabilities are always
    numpy float64: N×K class or grade probabilities, or N×L finding probabilities.
    """

    # The validation metric that picks the training epoch, and the extra per-epoch metrics
    # training records beside loss, accuracy and ROC AUC.
    selection = "roc_auc"
    epoch_metrics: tuple[str, ...] = ("accuracy", "roc_auc")

    def __init__(self, name: str, names: list[str]) -> None:
        self.name, self.names, self.k = name, names, len(names)

    # -- training --------------------------------------------------------------------------
    def outputs(self, cfg: TrainParams) -> int:
        """Units of the network's last layer."""
        return self.k

    def check(self, cfg: TrainParams) -> None:
        """Refuse, by name, training settings this task cannot take."""

    def loss(self, cfg: TrainParams, weights: torch.Tensor) -> nn.Module:
        """The loss of each image (reduction none), weighted by the balance stage's weights."""
        return make_loss(cfg, weights)

    def batch_weight(self, weights: torch.Tensor, labels: torch.Tensor) -> float:
        """What a batch's summed loss is divided by: its total weight (of its images' classes)."""
        return float(weights[labels].sum())

    def target(self, labels: np.ndarray) -> torch.Tensor:
        """Labels as the loss takes them."""
        return torch.from_numpy(labels)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The network's outputs as probabilities: a softmax over the classes (grades)."""
        return torch.softmax(logits, dim=1)

    def chance_loss(self, cfg: TrainParams) -> float:
        """The training loss of a model that knows nothing (all-zero logits), unweighted: ln K for
        cross-entropy (class weights and label smoothing leave it so), less for focal loss."""
        labels = self.chance_labels()
        logits = torch.zeros(len(labels), self.outputs(cfg))
        return float(self.loss(cfg, torch.ones(self.k))(logits, self.target(labels)).mean())

    def chance_labels(self) -> np.ndarray:
        return np.zeros(1, dtype=np.int64)

    def validation_loss(self, labels: np.ndarray, probs: np.ndarray, weights: list[float]) -> float:
        """Class-weighted cross-entropy of the probabilities, as training weighs its loss. The
        logarithm is numpy's, in float64: ``torch.log`` runs in MKL's vector math, whose last bits
        differ between CPU vendors (see :mod:`pipeline.core.kernels`)."""
        weight = np.asarray(weights, dtype=np.float64)[labels]
        picked = np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))
        return float(-(weight * picked).sum() / weight.sum())

    def epoch_scores(self, labels: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
        """``epoch_metrics`` of one pass (training as seen, or validation)."""
        raise NotImplementedError

    # -- frozen choices and decisions ----------------------------------------------------------
    def fit_temperature(self, method: str, labels: np.ndarray, raw: np.ndarray) -> float | list[float]:
        """``evaluate.calibrate`` fitted on validation: one temperature over the class probabilities."""
        from pipeline.evaluation import calibration  # scipy: loaded by evaluate, never by train

        return calibration.CALIBRATIONS[method](labels, raw)

    def calibrate(self, raw: np.ndarray, temperature: float | list[float]) -> np.ndarray:
        from pipeline.evaluation import calibration

        return calibration.apply_temperature(raw, temperature)

    def thresholds(self, rule: str, labels: np.ndarray, probs: np.ndarray, positive: int
                   ) -> float | list[float] | None:
        raise NotImplementedError

    def decide(self, probs: np.ndarray, threshold: Any, positive: int) -> np.ndarray:
        raise NotImplementedError

    def threshold_rule(self, rule: str, threshold: Any) -> str:
        return rule

    def describe(self, decision: Any) -> str:
        """One image's decision in words: its class or grade name."""
        return self.names[int(decision)]

    def describe_label(self, label: Any) -> str:
        """One image's true label in words."""
        return self.describe(label)

    def explained_probability(self, probs: np.ndarray, decision: Any, output: int) -> float:
        """The calibrated probability shown with a map: of the explained class."""
        return float(probs[output])

    def graph(self, logits: torch.Tensor, temperature: torch.Tensor, threshold: torch.Tensor | None, positive: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Calibrated probabilities and decisions from logits in torch alone, for an exported graph
        (ONNX): what :meth:`calibrate` and :meth:`decide` compute in numpy. The package
        calibrates softmax(log p / T) of the softmax p, which is softmax(logits / T)."""
        probs = torch.softmax(logits / temperature, dim=1)
        if threshold is None:
            return probs, probs.argmax(dim=1)
        return probs, torch.where(probs[:, positive] >= threshold, positive, 1 - positive).to(torch.int64)

    # -- evaluation -------------------------------------------------------------------------
    def headline(self, labels: np.ndarray, probs: np.ndarray, threshold: Any, positive: int) -> dict[str, Any]:
        """The task's point metrics (flat: metric name -> value) at the frozen decision."""
        raise NotImplementedError

    def baseline_problems(self, labels: np.ndarray, weights: np.ndarray, val_labels: np.ndarray
                          ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int | None]]:
        """What a classical baseline fits: (training rows, their labels, their sample weights,
        validation rows, their labels, the output column or None for all) per problem; here one,
        the classes (grades) as they are, weighted by class."""
        return [(np.arange(len(labels)), labels, weights[labels], np.arange(len(val_labels)), val_labels, None)]

    def membership_view(self, probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, labels) as the membership attacks read them (:mod:`pipeline.evaluation.membership`:
        the probability of the true class, calibrated per class)."""
        return probs, labels

    # -- explanation ---------------------------------------------------------------------------
    def outcome_order(self, positive: int | None) -> list[str]:
        """The outcomes explanations draw their samples from, in order."""
        if positive is not None:
            return ["true positive", "false negative", "true negative", "false positive"]
        return [outcome_name(name, ok) for name in self.names for ok in (True, False)]

    def explain_units(self, labels: np.ndarray, decisions: np.ndarray, positive: int | None, outputs: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(test index, outcome, output explained) of every candidate map: each image once, its
        decided class explained; outcomes true/false positive/negative for a binary decision at a
        threshold (``positive`` given), correctly classified or misclassified per class otherwise."""
        correct = labels == decisions
        if positive is not None:
            kinds = np.where(labels == positive, np.where(correct, "true positive", "false negative"),
                             np.where(correct, "true negative", "false positive")).astype(object)
        else:
            kinds = np.array([outcome_name(self.names[y], ok) for y, ok in zip(labels, correct)], dtype=object)
        return np.arange(len(labels)), kinds, self.explained_output(decisions, outputs)

    def explained_output(self, decisions: np.ndarray, outputs: int) -> np.ndarray:
        """The network output whose attribution explains each decision: the decided class."""
        return np.asarray(decisions, dtype=np.int64)

    def overlay_outputs(self, probs: np.ndarray, decisions: np.ndarray, outputs: int) -> np.ndarray:
        """The output each image's overlay (``pipeline.predict --explain``) explains: its decision's."""
        return self.explained_output(decisions, outputs)

    def output_name(self, output: int, outputs: int) -> str:
        return self.names[output]

    def localisation_units(self, labels: np.ndarray, positive: int, outputs: int
                           ) -> list[tuple[str, np.ndarray, np.ndarray, int | None]]:
        """(what is localised, which test images, the output explained for each, the mask value
        that marks it or None for any non-zero mask): the positive class's map of every image."""
        return [(self.names[positive], np.ones(len(labels), dtype=bool), np.full(len(labels), positive), None)]

    def confusions(self, labels: np.ndarray, decisions: np.ndarray) -> list[tuple[str, list[list[int]], list[str]]]:
        """(title, matrix with rows true and columns decided, tick names): the classes' (grades') one."""
        return [("", confusion_matrix(labels, decisions, self.k), self.names)]

    def curves(self, labels: np.ndarray, probs: np.ndarray, positive: int
               ) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(name, positive, score) of each one-vs-rest ROC and PR curve: every class (grade) present."""
        return [(name, labels == c, probs[:, c]) for c, name in enumerate(self.names) if (labels == c).any()]

    def calibration_pairs(self, labels: np.ndarray, probs: np.ndarray, positive: int
                          ) -> tuple[np.ndarray, np.ndarray, int]:
        """(labels, probabilities, positive class) as :mod:`pipeline.evaluation.calibration` judges
        them: P(positive) against the positive rate for two classes, else the top-label confidence
        against accuracy."""
        return labels, probs, positive

    def prediction_columns(self, labels: np.ndarray, probs: np.ndarray, raw: np.ndarray, decisions: np.ndarray
                           ) -> tuple[list[str], list[list[Any]]]:
        """Header and rows (without id and the out-of-distribution flag) of a predictions file:
        true label, calibrated and uncalibrated probabilities, the decision."""
        names = self.names
        header = ["label", *[f"prob_{n}" for n in names], *[f"uncalibrated_prob_{n}" for n in names], "prediction"]
        rows = [[names[y], *[f"{v:.6f}" for v in p], *[f"{v:.6f}" for v in r], names[d]]
                for y, p, r, d in zip(labels, probs, raw, decisions)]
        return header, rows
