"""Binary and multi-class tasks: one class per image (the pipeline's original task)."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.core.config import TrainParams
from pipeline.core.errors import PipelineError
from pipeline.evaluation.metrics import choose_threshold, classification_metrics, decide, roc_auc
from pipeline.tasks.base import Task


class SingleLabel(Task):
    """Softmax over K classes, the class-weighted cross-entropy (or focal) loss, one temperature,
    and a validation-chosen threshold on P(positive) for two classes (arg-max for more)."""

    family = "single"

    def check(self, cfg: TrainParams) -> None:
        if cfg.loss == "corn":
            raise PipelineError(f"train.loss=corn is a loss for ordinal grades; this is a {self.name} task "
                                "(use cross_entropy or focal, or data.task: ordinal for graded labels)")

    def epoch_scores(self, labels: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
        return {"accuracy": float((probs.argmax(1) == labels).mean()), "roc_auc": roc_auc(labels, probs)}

    def thresholds(self, rule: str, labels: np.ndarray, probs: np.ndarray, positive: int) -> float | None:
        return choose_threshold(rule, labels, probs, positive)

    def decide(self, probs: np.ndarray, threshold: float | None, positive: int) -> np.ndarray:
        return decide(probs, threshold, positive)

    def threshold_rule(self, rule: str, threshold: float | None) -> str:
        return rule if threshold is not None else "argmax"

    def curves(self, labels: np.ndarray, probs: np.ndarray, positive: int
               ) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """The positive class's curve for two classes, each present class's for more."""
        if self.k == 2:
            return [(self.names[positive], labels == positive, probs[:, positive])]
        return super().curves(labels, probs, positive)

    def headline(self, labels: np.ndarray, probs: np.ndarray, threshold: Any, positive: int) -> dict[str, Any]:
        metrics = classification_metrics(labels, probs, positive, threshold)
        return {"roc_auc": metrics["roc_auc"], "accuracy": metrics["accuracy"]}
