"""Ordinal tasks: grades whose order matters (diabetic retinopathy 0-4, Gleason, KL, BI-RADS).

Two losses: ``train.loss: corn`` (Shi, Cao & Raschka 2023, conditional ordinal regression:
K-1 outputs, output k the logit of P(grade > k | grade > k-1), trained on the images with
grade >= k; the cumulative probabilities are products of the conditional ones, so they never
cross) or plain class-weighted cross-entropy over K grades. Either way the model gives a
probability per grade, calibrated by one temperature on validation, and its decision is the
median grade (the first grade whose cumulative probability reaches 0.5): a ranking-aware rule
that an arg-max over unordered classes is not.

Metrics: quadratic weighted kappa (the DeepDRiD challenge's score), mean absolute error in
grades, accuracy, accuracy within one grade, MedMNIST's macro one-vs-rest ROC AUC over the
grade probabilities, and the ordinal confusion matrix. Training keeps the epoch of the best
validation kappa.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.core.config import TrainParams
from pipeline.evaluation.metrics import roc_auc
from pipeline.tasks.base import Task


def quadratic_kappa(labels: np.ndarray, grades: np.ndarray, k: int) -> float | None:
    """Cohen's kappa with quadratic weights (scikit-learn's ``cohen_kappa_score(weights="quadratic")``)."""
    observed = np.zeros((k, k))
    np.add.at(observed, (labels, grades), 1)
    expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
    weights = (np.arange(k)[:, None] - np.arange(k)[None, :]) ** 2
    disagreement = float((weights * expected).sum())
    return None if disagreement == 0 else 1.0 - float((weights * observed).sum()) / disagreement


def median_grade(probs: np.ndarray) -> np.ndarray:
    """The first grade whose cumulative probability reaches 0.5."""
    return (np.cumsum(probs, axis=1) < 0.5).sum(axis=1).clip(max=probs.shape[1] - 1)


class Ordinal(Task):
    family = "multioutput"
    selection = "kappa"
    epoch_metrics = ("accuracy", "roc_auc", "kappa")

    def outputs(self, cfg: TrainParams) -> int:
        return self.k - 1 if cfg.loss == "corn" else self.k

    def chance_labels(self) -> np.ndarray:
        return np.arange(self.k, dtype=np.int64)  # every grade once: chance is the mean over grades

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] == self.k:  # cross-entropy's K outputs
            return super().probabilities(logits)
        conditional = torch.sigmoid(logits)
        above = [conditional[:, :1]]  # P(grade > k) = the product of the conditionals up to k: never increasing
        for k in range(1, logits.shape[1]):  # (torch.cumprod has no ONNX export)
            above.append(above[-1] * conditional[:, k:k + 1])
        above = torch.cat(above, dim=1)
        return torch.cat([1 - above[:, :1], above[:, :-1] - above[:, 1:], above[:, -1:]], dim=1)

    def epoch_scores(self, labels: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
        grades = median_grade(probs)
        return {"accuracy": float((grades == labels).mean()), "roc_auc": roc_auc(labels, probs),
                "kappa": quadratic_kappa(labels, grades, self.k)}

    def thresholds(self, rule: str, labels: np.ndarray, probs: np.ndarray, positive: int) -> None:
        return None

    def decide(self, probs: np.ndarray, threshold: Any, positive: int) -> np.ndarray:
        return median_grade(probs)

    def graph(self, logits: torch.Tensor, temperature: torch.Tensor, threshold: torch.Tensor | None, positive: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(torch.log(self.probabilities(logits).clamp(1e-12, 1.0)) / temperature, dim=1)
        return probs, (torch.cumsum(probs, dim=1) < 0.5).sum(dim=1).clamp(max=self.k - 1)

    def threshold_rule(self, rule: str, threshold: Any) -> str:
        return "median grade"

    def headline(self, labels: np.ndarray, probs: np.ndarray, threshold: Any, positive: int) -> dict[str, Any]:
        scores = self.epoch_scores(labels, probs)
        return {"kappa": scores["kappa"], "roc_auc": scores["roc_auc"], "accuracy": scores["accuracy"]}

    def explained_output(self, decisions: np.ndarray, outputs: int) -> np.ndarray:
        """CORN: a grade-d decision is explained by output d-1, "grade >= d" (grade 0 by output 0,
        whose "no" made it); cross-entropy: by the decided grade's own output."""
        decisions = np.asarray(decisions, dtype=np.int64)
        return np.maximum(decisions - 1, 0) if outputs == self.k - 1 else decisions

    def output_name(self, output: int, outputs: int) -> str:
        return f"{self.names[output + 1]} or above" if outputs == self.k - 1 else self.names[output]

    def explained_probability(self, probs: np.ndarray, decision: Any, output: int) -> float:
        return float(probs[int(decision)])  # of the decided grade

    def localisation_units(self, labels: np.ndarray, positive: int, outputs: int
                           ) -> list[tuple[str, np.ndarray, np.ndarray, int | None]]:
        """The lesion of every graded image (grade >= 1) against the map of "grade >= 1" (CORN) or
        of its true grade (cross-entropy)."""
        target = np.zeros(len(labels), dtype=np.int64) if outputs == self.k - 1 else labels
        return [(f"lesion ({self.names[1]} or above)", labels >= 1, target, None)]

    def failures(self, labels: np.ndarray, probs: np.ndarray, decisions: np.ndarray, ids: np.ndarray, k: int
                 ) -> dict[str, list[dict[str, Any]]]:
        """The worst-graded images: farthest from the true grade first, then most confident."""
        wrong = np.flatnonzero(decisions != labels)
        confidence = probs[wrong, decisions[wrong]]
        order = np.lexsort((-confidence, -np.abs(decisions[wrong] - labels[wrong])))[:k]
        return {"errors": [{"index": int(i), "id": str(ids[i]), "label": self.names[labels[i]],
                            "predicted": self.names[decisions[i]], "score": round(float(probs[i, decisions[i]]), 6)}
                           for i in wrong[order]]}

    def metrics(self, labels: np.ndarray, probs: np.ndarray, threshold: Any) -> dict[str, float | None]:
        grades = median_grade(probs)
        error = np.abs(grades - labels)
        return {"kappa": quadratic_kappa(labels, grades, self.k), "mae": float(error.mean()),
                "accuracy": float((error == 0).mean()), "within_one": float((error <= 1).mean()),
                "roc_auc": roc_auc(labels, probs)}
