"""The model package, ``models/model.pt``: everything between a raw image file and a decision.

Written by the evaluate stage, once the choices made on validation are frozen, and read by
explain, report, track, ``pipeline.predict`` and the MLflow model alike, so every consumer
scores an image the same way evaluate did:

- the network: config (architecture, input size and channels, the training split's mean and
  standard deviation, applied inside the model) and weights;
- the preprocessing prepare applied (``data.image_size`` with its centre-crop + bilinear
  rule, ``data.channels``, the DICOM window and frame policy), and the size and channels the
  network takes;
- the task (:mod:`pipeline.tasks`; absent for one class per image, so that package keeps its
  bytes), the class, finding or grade names and the positive class; the temperature and the
  operating threshold fitted on validation (one of each per finding for multi-label tasks;
  no threshold for grades, decided by the median grade), with the rule that chose it;
- the training images' intensity statistics, for the out-of-distribution flag;
- provenance: sha256 of the prepared data and of the trained network's file, and the DP-SGD
  guarantee the training spent (ε, δ, accountant, clipping, noise; None without privacy).

Plain values and tensors only: ``torch.load(weights_only=True)`` reads it, no pickled object.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.dataset import ImageRows
from pipeline.core.errors import PipelineError
from pipeline.core.files import rounded
from pipeline.modeling.checkpoints import load_checkpoint, save_checkpoint
from pipeline.modeling.networks import Classifier, predict_proba
from pipeline.tasks import Task, for_data

FORMAT = "medcnn-package/1"
HISTOGRAM_BINS = 32
# Out-of-distribution rule: an image is flagged when its mean, its standard deviation or the
# L1 distance of its intensity histogram from the training images' mean histogram falls
# outside the range of the central 99.8% of training images, widened by 10% of that range.
OOD_QUANTILES = (0.001, 0.999)
OOD_MARGIN = 0.1
OOD_WARNING = "warning: out of distribution"


def intensity_features(images: np.ndarray, reference: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per image (N×H×W×C uint8): mean, standard deviation, its normalised ``HISTOGRAM_BINS``-bin
    histogram and, given the training mean histogram, the L1 distance from it; all from each
    image's 256-value histogram, so memory stays at the images' own size."""
    flat = images.reshape(len(images), -1)
    counts = np.stack([np.bincount(row, minlength=256) for row in flat]).astype(np.float64) / flat.shape[1]
    values = np.arange(256, dtype=np.float64)
    mean = counts @ values
    features = {"mean": mean, "std": np.sqrt(np.maximum(counts @ values**2 - mean**2, 0.0)),
                "histogram": counts.reshape(len(flat), HISTOGRAM_BINS, -1).sum(axis=2)}
    if reference is not None:
        features["histogram_distance"] = np.abs(features["histogram"] - reference).sum(axis=1)
    return features


def intensity_reference(train_images: np.ndarray | ImageRows, batch: int = 1024) -> dict[str, Any]:
    """The training images' statistics and the allowed range of each (see ``OOD_QUANTILES``)."""
    parts = [intensity_features(np.asarray(train_images[i:i + batch])) for i in range(0, len(train_images), batch)]
    histogram = np.concatenate([p["histogram"] for p in parts]).mean(axis=0)
    features = {key: np.concatenate([p[key] for p in parts]) for key in ("mean", "std")}
    features["histogram_distance"] = np.concatenate([
        intensity_features(np.asarray(train_images[i:i + batch]), histogram)["histogram_distance"]
        for i in range(0, len(train_images), batch)])
    ranges = {}
    for key, values in features.items():
        low, high = np.quantile(values, OOD_QUANTILES)
        margin = OOD_MARGIN * (high - low)
        ranges[key] = [rounded(float(low - margin)), rounded(float(high + margin))]
    return {"histogram": [rounded(float(v)) for v in histogram], "ranges": ranges,
            "rule": f"flag an image whose mean, standard deviation or histogram distance lies outside the central "
                    f"{100 * (OOD_QUANTILES[1] - OOD_QUANTILES[0]):.1f}% of training images, widened by "
                    f"{OOD_MARGIN:.0%} of that range"}


@dataclasses.dataclass
class Scores:
    probabilities: np.ndarray  # calibrated, N×K (multi-label: N×L, one probability per finding)
    uncalibrated: np.ndarray
    predictions: np.ndarray  # class index at the frozen threshold (binary), arg-max, median grade; N×L 0/1 findings
    out_of_distribution: np.ndarray  # bool per image


@dataclasses.dataclass
class ModelPackage:
    network: Classifier
    class_names: list[str]
    positive_class: int
    temperature: float | list[float]
    threshold: float | list[float] | None
    threshold_rule: str
    preprocessing: dict[str, Any]
    intensity: dict[str, Any]
    provenance: dict[str, Any]
    task: str | None = None  # None: one class per image (binary or multi-class)

    @property
    def kind(self) -> Task:
        """The task object (:mod:`pipeline.tasks`) that turns outputs into probabilities and decisions."""
        return for_data(self.task, self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(H, W, C) of the images the network takes; (D, H, W, C) of volumes."""
        return (*self.preprocessing["input_size"], self.preprocessing["input_channels"])

    def score(self, images: np.ndarray | ImageRows, batch_size: int = 64) -> Scores:
        """Calibrated probabilities, decisions and out-of-distribution flags for N×H×W×C uint8
        images: an array, or rows read from disk batch by batch."""
        return self.scores(self.uncalibrated(images, batch_size), images)

    def scores(self, raw: np.ndarray, images: np.ndarray | ImageRows) -> Scores:
        """:meth:`score` from the network's probabilities ``raw`` already computed for ``images``."""
        probs = self.calibrated(raw)
        return Scores(probs, raw, self.kind.decide(probs, self.threshold, self.positive_class),
                      self.out_of_distribution(images))

    def describe(self, decision: np.ndarray | int) -> str:
        """One image's decision in words: the class or grade, or the findings present."""
        return self.kind.describe(decision)

    def uncalibrated(self, images: np.ndarray | ImageRows, batch_size: int = 64) -> np.ndarray:
        """The network's probabilities alone (no temperature, no decision, no out-of-distribution check)."""
        if tuple(images.shape[1:]) != self.input_shape:
            raise PipelineError(f"images of shape {tuple(images.shape)}; the model takes N×"
                                f"{'×'.join(map(str, self.input_shape))} uint8")
        return predict_proba(self.network, images, batch_size, activation=self.kind.probabilities)

    def calibrated(self, raw: np.ndarray) -> np.ndarray:
        """The network's probabilities (:meth:`uncalibrated`) after the validation-fitted temperature(s)."""
        return self.kind.calibrate(raw, self.temperature)

    def out_of_distribution(self, images: np.ndarray | ImageRows, chunk: int = 1024) -> np.ndarray:
        reference = np.asarray(self.intensity["histogram"])
        flagged = np.zeros(len(images), dtype=bool)
        for start in range(0, len(images), chunk):
            features = intensity_features(np.asarray(images[start:start + chunk]), reference)
            for key, (low, high) in self.intensity["ranges"].items():
                flagged[start:start + chunk] |= (features[key] < low) | (features[key] > high)
        return flagged

    def state(self) -> dict[str, Any]:
        return {"format": FORMAT, "class_names": self.class_names, "positive_class": self.positive_class,
                "temperature": self.temperature, "threshold": self.threshold, "threshold_rule": self.threshold_rule,
                "preprocessing": self.preprocessing, "intensity": self.intensity, "provenance": self.provenance,
                **({"task": self.task} if self.task else {})}


def save_package(path: str | Path, package: ModelPackage) -> None:
    save_checkpoint(path, package.network, package.state())


def load_package(path: str | Path) -> ModelPackage:
    """The package in eval mode; a clear error for a file that is not one (e.g. the bare network)."""
    network, state = load_checkpoint(path)
    if state.get("format") != FORMAT:
        raise PipelineError(f"{path}: not a medcnn model package (format {state.get('format')!r}, expected "
                            f"{FORMAT!r}); the evaluate stage writes models/model.pt")
    fields = {f.name for f in dataclasses.fields(ModelPackage)} - {"network"}
    return ModelPackage(network=network, **{key: state[key] for key in fields if key in state})
