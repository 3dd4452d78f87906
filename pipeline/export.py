"""Export the model package for deployment outside Python: ``python -m pipeline.export --format onnx``.

Writes ``models/model.onnx`` (or ``-o PATH``): one ONNX graph that takes what the package
takes, uint8 images N×H×W×C (volumes N×D×H×W×C) at the model's input size, and does what
``pipeline.predict`` does after decoding and resizing: scale to [0, 1], the network (batch norm
folded, the training split's standardisation inside), the temperature fitted on validation,
and the decision at the frozen threshold (arg-max for multi-class). Outputs: ``probabilities``
(N×K float32, calibrated) and ``prediction`` (N int64 class indices). The class names,
threshold, temperature, input shape, the preprocessing a file needs before it reaches the
graph (decoding, DICOM window, centre-crop and resize) and the package's sha256 are in the
model's metadata. The out-of-distribution flag is not in the graph.

Before the file is written, onnxruntime scores the prepared test split (random images of the
input shape where there is none) and the export is refused unless every probability equals
the package's to 1e-5 and every decision is the same.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.core import paths
from pipeline.core.dataset import load_split
from pipeline.core.errors import PipelineError
from pipeline.core.files import file_digest, write_bytes
from pipeline.core.runtime import configure_logging, configure_torch, run_command
from pipeline.modeling.networks import folded
from pipeline.modeling.package import ModelPackage, load_package

log = logging.getLogger(__name__)

TOLERANCE = 1e-5
OPSET = 18


class Deployable(nn.Module):
    """The package from uint8 pixels to calibrated probabilities and decisions, as one module:
    the task's own graph (:meth:`pipeline.tasks.Task.graph`) after the folded network."""

    def __init__(self, package: ModelPackage) -> None:
        super().__init__()
        self.network = folded(package.network)
        self.task = package.kind
        self.register_buffer("temperature", torch.tensor(package.temperature, dtype=torch.float32))
        self.register_buffer("threshold", None if package.threshold is None
                             else torch.tensor(package.threshold, dtype=torch.float32))
        self.positive = package.positive_class

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.to(torch.float32).div(255.0).movedim(-1, 1)
        return self.task.graph(self.network(x), self.temperature, self.threshold, self.positive)


def metadata(package: ModelPackage, package_path: Path) -> dict[str, str]:
    return {"medcnn.class_names": json.dumps(package.class_names), "medcnn.positive_class": str(package.positive_class),
            "medcnn.threshold": json.dumps(package.threshold), "medcnn.threshold_rule": package.threshold_rule,
            "medcnn.temperature": str(package.temperature), "medcnn.input_shape": json.dumps(package.input_shape),
            "medcnn.preprocessing": json.dumps(package.preprocessing, sort_keys=True),
            "medcnn.package_sha256": file_digest(package_path)}


def to_onnx(package: ModelPackage, package_path: Path) -> bytes:
    """The ONNX model's bytes (dynamic batch size), with the package's facts as metadata."""
    import onnx

    example = torch.zeros((2, *package.input_shape), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    quiet = logging.getLogger("torch.onnx")  # the exporter logs every torchvision op it cannot register
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(Deployable(package).eval(), (example,), dynamo=True, opset_version=OPSET,
                                        input_names=["images"], output_names=["probabilities", "prediction"],
                                        dynamic_shapes=({0: batch},), artifacts_dir=tmp, verbose=False)
    finally:
        quiet.setLevel(level)
    model = program.model_proto
    for key, value in metadata(package, package_path).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def check_images(package: ModelPackage, prepared: Path, limit: int = 256) -> np.ndarray:
    """The prepared test split's first images, or seeded random ones of the input shape."""
    if (prepared / "test").is_dir():
        images = np.asarray(load_split(prepared, "test")["images"][:limit])
        if tuple(images.shape[1:]) == package.input_shape:
            return images
    return np.random.default_rng(0).integers(0, 256, (64, *package.input_shape), dtype=np.uint8)


def compare(model: bytes, package: ModelPackage, images: np.ndarray) -> dict[str, Any]:
    """onnxruntime's answers against the package's on ``images``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    probs, decisions = session.run(None, {"images": images})
    expected = package.score(images)
    return {"images": len(images), "max_abs_difference": float(np.abs(probs - expected.probabilities).max()),
            "decisions_equal": bool(np.array_equal(decisions, expected.predictions))}


def run(model_path: Path = paths.MODEL, output: Path = Path("models/model.onnx"), fmt: str = "onnx",
        prepared: Path = paths.PREPARED) -> dict[str, Any]:
    if fmt != "onnx":
        raise PipelineError(f"--format {fmt}: only onnx is supported")
    configure_torch(1)
    package = load_package(model_path)
    model = to_onnx(package, model_path)
    found = compare(model, package, check_images(package, prepared))
    if found["max_abs_difference"] > TOLERANCE or not found["decisions_equal"]:
        raise PipelineError(f"{output}: not written: onnxruntime differs from the model package on {found['images']} "
                            f"images (largest probability difference {found['max_abs_difference']:.2e}, decisions "
                            f"{'equal' if found['decisions_equal'] else 'differ'})")
    write_bytes(output, model)
    print(f"export: {output} ({len(model) / 1024:.0f} kB), onnxruntime agrees with {model_path} on {found['images']} "
          f"images (largest probability difference {found['max_abs_difference']:.1e}, same decisions)")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", default="onnx", choices=("onnx",), help="export format (default: onnx)")
    parser.add_argument("--model", type=Path, default=paths.MODEL, help="model package (default: models/model.pt)")
    parser.add_argument("-o", "--output", type=Path, default=Path("models/model.onnx"),
                        help="file to write (default: models/model.onnx)")
    args = parser.parse_args()
    configure_logging()
    run_command(lambda: run(args.model, args.output, args.format) and 0)


if __name__ == "__main__":
    main()
