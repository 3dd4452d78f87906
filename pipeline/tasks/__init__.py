"""One object per kind of label, owning everything that differs between them.

A stage never asks which task it runs; it asks the task (``TASKS[meta["task"]]``, built for
the data's number of classes, findings or grades by :func:`for_data`):

=====================  ==============================  ==========================  ==========================
                       binary / multiclass             multilabel                  ordinal
=====================  ==============================  ==========================  ==========================
network outputs        K logits                        L logits, one per finding   K-1 (``train.loss: corn``)
                                                                                   or K logits
probabilities          softmax                         sigmoid per finding         P(grade) from the cumulative
                                                                                   P(grade > k)
loss                   class-weighted cross-entropy    BCE with positive weights,  CORN or class-weighted
                       or focal                        unknown entries masked      cross-entropy
decision               threshold on P(positive) /      per-finding thresholds      the median grade
                       arg-max                         chosen on validation
calibration            one temperature                 one temperature per finding one temperature
headline metrics       AUC, accuracy, sensitivity, …   per-finding AUC, AP,        quadratic weighted kappa,
                                                       sensitivity, specificity;   MAE, accuracy, within one
                                                       macro/micro AUC, MedMNIST   grade, macro AUC
                                                       ACC
=====================  ==============================  ==========================  ==========================

Training selects its epoch by the task's ``selection`` metric on validation (ROC AUC, macro
AUC, kappa). Everything here runs in float64 numpy once the network's outputs are out of
torch, so a metric never depends on a CPU's vector-math kernels.
"""

from __future__ import annotations

from pipeline.tasks.base import Task
from pipeline.tasks.multilabel import MultiLabel
from pipeline.tasks.ordinal import Ordinal
from pipeline.tasks.single import SingleLabel

TASKS: dict[str, type[Task]] = {"binary": SingleLabel, "multiclass": SingleLabel, "multilabel": MultiLabel,
                                "ordinal": Ordinal}


def for_data(name: str | None, names: list[str]) -> Task:
    """The task of prepared data (meta's ``task``; absent in data prepared before tasks existed:
    one class per image) over its class, finding or grade ``names``."""
    name = name or ("binary" if len(names) == 2 else "multiclass")
    return TASKS[name](name, list(names))


__all__ = ["TASKS", "Task", "for_data"]
