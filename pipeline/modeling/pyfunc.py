"""The model package as an MLflow ``python_function`` model, without pickles.

MLflow loads it through this module (the pyfunc ``loader_module``): ``_load_pyfunc`` reads
``models/model.pt`` with ``torch.load(weights_only=True)`` and returns an object whose
``predict`` takes N×H×W×C uint8 images (N×D×H×W×C volumes for a model of volumes), as a numpy array or as the nested lists an HTTP
request carries, and answers with :meth:`~pipeline.modeling.package.ModelPackage.score`'s
numbers: the calibrated probability of each class, the predicted class at the frozen
threshold and a status, one row per image, as ``pipeline.predict`` writes them. No class is
pickled: what MLflow stores is the package file plus this module's name, so loading needs
neither ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` nor trust in a pickle. This module does not
import MLflow; ``pipeline.reporting.mlflow_adapter`` logs it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.modeling.package import OOD_WARNING, ModelPackage, load_package


def output_columns(class_names: list[str]) -> list[str]:
    return [*[f"prob_{name}" for name in class_names], "prediction", "status"]


class PackagePredictor:
    def __init__(self, package: ModelPackage) -> None:
        self.package = package

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        import pandas as pd

        images = np.asarray(model_input)
        if images.dtype != np.uint8:
            if not np.all((images >= 0) & (images <= 255) & (images == np.rint(images))):
                raise ValueError("images must be uint8 pixel values 0..255")
            images = images.astype(np.uint8)
        scores = self.package.score(images)
        names = self.package.class_names
        frame = pd.DataFrame(scores.probabilities, columns=output_columns(names)[:len(names)])
        frame["prediction"] = [self.package.describe(k) for k in scores.predictions]
        frame["status"] = [OOD_WARNING if flag else "ok" for flag in scores.out_of_distribution]
        return frame


def _load_pyfunc(data_path: str) -> PackagePredictor:
    """MLflow's entry point: ``data_path`` is the logged copy of ``models/model.pt``."""
    return PackagePredictor(load_package(data_path))
