"""Score new images with the model package: ``python -m pipeline.predict INPUT -o OUTPUT.csv``.

Also installed as ``medcnn-predict``. INPUT is an image or DICOM file, a folder, a CSV
manifest with a ``path`` column or a MedMNIST-style ``.npz`` (see :mod:`pipeline.data.inputs`).
Every image goes through what evaluate did to the test split, all of it read from the package
(``models/model.pt`` unless ``--model``): the same decoding and DICOM window, the
preprocessing prepare applied, the network, the temperature and the frozen threshold. So the
probabilities are evaluate's, to 1e-5, for the same pixels.

One output row per input: an id, the calibrated probability of each class, the predicted
class and a status. A file's id is its path relative to INPUT hashed with the secret salt
``$MEDCNN_PSEUDONYM_SALT`` (prepare's rule), which must then be set, or, with ``--ids path``,
that path itself, for inputs that hold no patient data; an ``.npz`` row's id is its position.
The status is ``ok``; ``warning: out of distribution`` (scored, but the
image's intensities are unlike the training images', see
:data:`pipeline.modeling.package.OOD_QUANTILES`); or ``error: <reason>`` (no probability)
for a file that cannot become an image the model takes. The other rows are still scored, and
the exit code is 1 when any row failed. ``--explain DIR`` also writes a Grad-CAM and an
Integrated Gradients overlay per scored image, with the explain settings of ``--params``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.core import paths
from pipeline.core.config import ExplainParams, load_params
from pipeline.core.errors import PipelineError
from pipeline.core.files import write_csv
from pipeline.core.runtime import configure_logging, run_command
from pipeline.data.dicom import ImageError
from pipeline.data.images import preprocess
from pipeline.data.inputs import Input, holds_files, list_inputs
from pipeline.data.privacy import SALT_ENV, resolve_salt
from pipeline.modeling.package import OOD_WARNING, ModelPackage, load_package

log = logging.getLogger(__name__)

EXPLAIN_METHODS = ("grad_cam", "integrated_gradients")


def header(package: ModelPackage) -> list[str]:
    return ["id", *[f"prob_{name}" for name in package.class_names], "prediction", "status"]


def model_input(package: ModelPackage, item: Input) -> np.ndarray:
    """The item's pixels as the network takes them; ImageError with the reason otherwise."""
    image, tags = item.load()
    pre = package.preprocessing
    image = preprocess(image, pre["image_size"], pre["channels"], tags.get("spacing"), pre.get("spacing"))
    if image.shape != package.input_shape:
        want = "×".join(map(str, package.input_shape))
        rules = (f"preprocessed with data.image_size {pre['image_size']} and data.channels {pre['channels']}"
                 if pre["image_size"] or pre["channels"] else
                 "trained on images kept at their stored size and channels, so none is resized or converted")
        raise ImageError(f"image is {'×'.join(map(str, image.shape))} but the model takes {want} ({rules})")
    return image


class _Decoded(torch.utils.data.Dataset):
    """Item i: (i, pixels as the model takes them) or (i, the reason it cannot be scored)."""

    def __init__(self, package: ModelPackage, inputs: list[Input]) -> None:
        self.package, self.inputs = package, inputs

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | str]:
        try:
            return index, model_input(self.package, self.inputs[index])
        except ImageError as exc:
            return index, str(exc)


def score_inputs(package: ModelPackage, inputs: list[Input], batch_size: int = 64,
                 explain: tuple[Path, ExplainParams, int] | None = None, workers: int = 0) -> list[list[Any]]:
    """One output row per input, in order; failed inputs get an ``error:`` status and no probability.

    ``workers`` processes decode files (a ``torch.utils.data.DataLoader``) while this one scores;
    results come back in input order.
    """
    rows: list[list[Any]] = [[]] * len(inputs)
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        batch = np.stack([image for _, image in pending])
        scores = package.score(batch, batch_size)
        for (index, _), probs, pred, ood in zip(pending, scores.probabilities, scores.predictions,
                                                scores.out_of_distribution):
            rows[index] = [inputs[index].id, *[f"{p:.6f}" for p in probs], package.describe(pred),
                           OOD_WARNING if ood else "ok"]
        if explain:
            write_overlays(package, batch, scores.probabilities, scores.predictions,
                           [inputs[i].id for i, _ in pending], *explain)
        pending.clear()

    # Workers hand back whole batches (one message each), kept as lists: no tensor conversion.
    loader = torch.utils.data.DataLoader(_Decoded(package, inputs), batch_size=batch_size, num_workers=workers,
                                         collate_fn=list)
    with tqdm(total=len(inputs), desc="predict", unit="image", disable=None) as progress:
        for decoded in loader:
            for index, image in decoded:
                if isinstance(image, str):
                    log.warning("%s: %s", inputs[index].where, image)
                    rows[index] = [inputs[index].id, *[""] * len(package.class_names), "", f"error: {image}"]
                else:
                    pending.append((index, image))
                if len(pending) == batch_size:
                    flush()
            progress.update(len(decoded))
    flush()
    return rows


def write_overlays(package: ModelPackage, images: np.ndarray, probabilities: np.ndarray, predictions: np.ndarray,
                   ids: list[str], folder: Path, cfg: ExplainParams, seed: int) -> None:
    """A Grad-CAM and an Integrated Gradients map of the decision over each image (volume): the
    predicted class or grade; for findings, the most probable one."""
    import torch

    from pipeline.modeling.networks import channels_last, images_to_tensor
    from pipeline.reporting.plots import plot_attributions, plot_volume_attributions
    from pipeline.xai.attributions import TITLES, attribute

    inputs = images_to_tensor(images)
    task, outputs = package.kind, package.network.config.num_classes
    targets = task.overlay_outputs(probabilities, predictions, outputs)
    maps = attribute(package.network, inputs, torch.as_tensor(targets), cfg, seed, EXPLAIN_METHODS)
    plot = plot_volume_attributions if inputs.ndim == 5 else plot_attributions
    for row, sample_id in enumerate(ids):
        shown = "" if task.family == "single" else f", map of {task.output_name(int(targets[row]), outputs)}"
        plot(channels_last(inputs[row]), {TITLES[m]: maps[m][row] for m in EXPLAIN_METHODS},
             f"{sample_id}: predicted {package.describe(predictions[row])}{shown}", folder / f"{sample_id}.png")


def find_package(model_path: Path) -> ModelPackage:
    """The model package; a missing default one is explained by where predict was run from."""
    if not model_path.exists() and model_path == paths.MODEL:
        raise PipelineError(f"no model package at {paths.MODEL} in {Path.cwd()}: run predict from the medcnn project "
                            "folder (where `dvc repro` writes it), or name one with --model PATH")
    return load_package(model_path)


def id_salt(input_path: Path, ids: str) -> str | None:
    """The salt the ids are hashed with, or None when ids are the inputs' own paths (``--ids path``).

    Files' names and paths often carry patient names or record numbers, so their ids are salted
    hashes, as prepare makes them; a hash without a secret salt hides nothing (anyone with the
    files can recompute it), so predict refuses it instead of pretending."""
    if ids == "path" or not holds_files(input_path):
        return None if ids == "path" else ""
    salt = resolve_salt("")
    if not salt:
        raise PipelineError(f"{input_path}: ids of files are salted hashes of their paths, and "
                            f"${SALT_ENV} is not set: without a secret salt anyone holding the files can tell which "
                            f"file an id names. Set ${SALT_ENV} (the data owner's secret), or pass --ids path to "
                            "write each file's path as its id, for inputs that hold no patient data")
    return salt


def run(input_path: Path, output: Path, model_path: Path = paths.MODEL, explain_dir: Path | None = None,
        params_path: Path = paths.PARAMS, batch_size: int = 64, workers: int = 0,
        ids: str = "pseudonym") -> dict[str, int]:
    """Score every input into ``output``; returns counts per status kind."""
    start = time.perf_counter()
    if not input_path.exists():
        raise PipelineError(f"{input_path}: not found")
    salt = id_salt(input_path, ids)
    package = find_package(model_path)
    dicom = package.preprocessing["dicom"]
    inputs = list_inputs(input_path, salt, (dicom["window_center"], dicom["window_width"]),
                         dicom["frames"], series=len(package.input_shape) == 4)
    explain = None
    if explain_dir is not None:
        if not params_path.is_file():
            raise PipelineError(f"{params_path}: --explain reads the explain settings from a params file; "
                                "run from the project or pass --params")
        params = load_params(params_path)
        explain = (explain_dir, params.explain, params.seed)
        explain_dir.mkdir(parents=True, exist_ok=True)
    rows = score_inputs(package, inputs, batch_size, explain, workers)
    write_csv(output, header(package), rows)
    counts = {"ok": sum(r[-1] == "ok" for r in rows), "warning": sum(r[-1] == OOD_WARNING for r in rows),
              "error": sum(r[-1].startswith("error") for r in rows)}
    print(f"predict: {len(rows)} image(s) in {time.perf_counter() - start:.1f} s: {counts['ok']} ok, "
          f"{counts['warning']} out of distribution, {counts['error']} failed -> {output}")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path, help="image or DICOM file, folder, CSV manifest (path column) or .npz")
    parser.add_argument("-o", "--output", type=Path, required=True, help="CSV to write (one row per input)")
    parser.add_argument("--model", type=Path, default=paths.MODEL, help="model package (default: models/model.pt)")
    parser.add_argument("--explain", type=Path, metavar="DIR", help="also write Grad-CAM and IG overlays here")
    parser.add_argument("--params", type=Path, default=paths.PARAMS, help="params file for --explain's settings")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0,
                        help="processes that decode files while this one scores (pays for large JPEG/DICOM images; "
                             "on small PNGs the hand-over costs more than it saves)")
    parser.add_argument("--ids", choices=("pseudonym", "path"), default="pseudonym",
                        help=f"pseudonym (default): a file's id is a hash of its path salted with ${SALT_ENV}, which "
                             "must be set; path: the file's path relative to INPUT, for inputs that hold no patient "
                             "data")
    args = parser.parse_args()
    configure_logging()

    def work() -> int:
        counts = run(args.input, args.output, args.model, args.explain, args.params, args.batch_size, args.workers,
                     args.ids)
        if counts["error"]:
            print(f"error: {counts['error']} input(s) could not be scored; see the status column of {args.output}",
                  file=sys.stderr)
            return 1
        return 0

    run_command(work)


if __name__ == "__main__":
    main()
