"""Training throughput in the NCHW and channels-last layouts (``train.channels_last``), by image
size and network width: the numbers behind the README's advice on when to turn it on.

For each image size, synthetic uint8 images are written to a ``.npy`` file and streamed as the
train stage streams them; for each width the project's ``train_epoch`` (default params:
augmentation, weight averaging) trains the default network once per layout, the layouts
alternating round by round so machine noise hits both alike. The first round warms up and is
not counted; the table gives the median images/s of the others.

    python bench/layout.py                                  # 28, 64 and 128 px; widths 4 and 12
    python bench/layout.py --sizes 128 --widths 32 --images 512
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import REPO, provenance

from pipeline.core.config import load_params
from pipeline.core.dataset import ImageRows, TrainingSet
from pipeline.core.runtime import configure_torch
from pipeline.modeling.networks import ModelConfig, build_model
from pipeline.modeling.recipe import WeightAverage, layout, make_loss, make_optimizer
from pipeline.tasks import for_data
from pipeline.train import train_epoch

BINARY = for_data("binary", ["normal", "lesion"])


def streamed(folder: Path, size: int, images: int) -> TrainingSet:
    """``images`` random size×size images and labels, read from disk like the prepared set."""
    rng = np.random.default_rng(0)
    path = folder / f"images-{size}.npy"
    np.save(path, rng.integers(0, 256, (images, size, size, 1), dtype=np.uint8))
    return TrainingSet(ImageRows(path), np.arange(images), np.zeros((0, size, size, 1), np.uint8),
                       rng.integers(0, 2, images), [1.0, 1.0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 64, 128])
    parser.add_argument("--widths", type=int, nargs="+", default=[4, 12])
    parser.add_argument("--images", type=int, default=1024, help="training images per epoch")
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per layout")
    args = parser.parse_args()
    print(provenance())
    base = load_params(REPO / "params.yaml").train
    configure_torch(base.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="medcnn-layout-") as tmp:
        for size in args.sizes:
            data = streamed(Path(tmp), size, args.images)
            for width in args.widths:
                runs = {}
                for channels_last in (False, True):
                    cfg = dataclasses.replace(base, width=width, channels_last=channels_last)
                    torch.manual_seed(0)
                    model = build_model(ModelConfig(cfg.model, 1, 2, size, width, 0.5, 0.25, norm=cfg.norm)).to(
                        memory_format=layout(cfg, 2))
                    runs[channels_last] = (cfg, model, make_optimizer(model, cfg), make_loss(cfg, torch.ones(2)),
                                           torch.Generator().manual_seed(0),
                                           WeightAverage(model, cfg.ema) if cfg.ema else None, [])
                for epoch in range(1, args.rounds + 2):
                    for cfg, model, optimizer, loss_fn, generator, average, rates in runs.values():
                        start = time.perf_counter()
                        train_epoch(model, data, BINARY, loss_fn, optimizer, cfg, generator, torch.device("cpu"), epoch,
                                    average)
                        if epoch > 1:
                            rates.append(args.images / (time.perf_counter() - start))
                nchw, nhwc = (float(np.median(runs[flag][-1])) for flag in (False, True))
                rows.append((size, width, nchw, nhwc))
                print(f"{size} px, width {width}: NCHW {nchw:.0f}, channels last {nhwc:.0f} images/s", flush=True)
    print(f"\n{base.model}, batch {base.batch_size}, {base.threads} threads, {args.images} images, median of "
          f"{args.rounds} epochs")
    print("| image size | width | NCHW images/s | channels last images/s | channels last / NCHW |")
    print("|---|---|---|---|---|")
    for size, width, nchw, nhwc in rows:
        print(f"| {size} px | {width} | {nchw:.0f} | {nhwc:.0f} | {nhwc / nchw:.2f} |")


if __name__ == "__main__":
    main()
