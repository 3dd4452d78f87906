"""Prepare at scale: wall time and peak memory for 10k and 50k synthetic 128×128 images.

For each size, writes the images once as a PNG folder (two class folders) and once as a
MedMNIST-format .npz, then runs the real prepare stage on each in a subprocess and prints
wall time and the subprocess's peak RSS next to the size of the prepared image array.
A streaming prepare keeps its peak RSS well below 2× the output array.

    python bench/prepare_scale.py            # 10000 and 50000 images (several minutes, ~3 GB disk)
    python bench/prepare_scale.py 2000       # a quick check
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from common import REPO, provenance, run_stage
from PIL import Image

SIZE = 128


def synthetic(n: int, seed: int = 0):
    """Smooth random images (so PNGs are realistic in size), in batches of 1000."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    for start in range(0, n, 1000):
        count = min(1000, n - start)
        f = rng.uniform(1, 6, (count, 2, 1, 1))
        phase = rng.uniform(0, 6.3, (count, 2, 1, 1))
        images = 127 + 60 * np.sin(f[:, 0] * 6.3 * xx + phase[:, 0]) * np.cos(f[:, 1] * 6.3 * yy + phase[:, 1])
        images += rng.normal(0, 8, images.shape)
        yield start, np.clip(images, 0, 255).astype(np.uint8), (np.arange(start, start + count) % 5 == 0).astype(np.uint8)


def write_folder(root: Path, n: int) -> None:
    for start, images, labels in synthetic(n):
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / ("positive" if label else "negative")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"img{start + i:06d}.png", compress_level=1)


def write_npz(path: Path, n: int) -> None:
    images = np.empty((n, SIZE, SIZE), np.uint8)
    labels = np.empty((n, 1), np.uint8)
    for start, batch, batch_labels in synthetic(n):
        images[start:start + len(batch)] = batch
        labels[start:start + len(batch), 0] = batch_labels
    cut1, cut2 = int(n * 0.7), int(n * 0.8)
    np.savez(path, train_images=images[:cut1], train_labels=labels[:cut1], val_images=images[cut1:cut2],
             val_labels=labels[cut1:cut2], test_images=images[cut2:], test_labels=labels[cut2:])


def run_prepare(work: Path, data: dict) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of the prepare stage run in ``work``."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(data)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    return run_stage(work, "prepare")


def main() -> None:
    print(provenance())
    sizes = [int(a) for a in sys.argv[1:]] or [10_000, 50_000]
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="medcnn-scale-") as tmp:
            tmp = Path(tmp)
            output_mb = n * SIZE * SIZE / 2**20
            write_folder(tmp / "folder", n)
            wall, rss = run_prepare(tmp, {"source": "folder", "path": str(tmp / "folder"), "split": {"val": 0.1, "test": 0.2}})
            rows.append(("folder (PNG)", n, output_mb, wall, rss))
            write_npz(tmp / "images.npz", n)
            wall, rss = run_prepare(tmp, {"source": "npz", "path": str(tmp / "images.npz")})
            rows.append(("array (.npz)", n, output_mb, wall, rss))
    print(f"{'source':<14}{'images':>8}{'output MB':>11}{'wall s':>9}{'peak RSS MB':>13}{'RSS/output':>12}")
    for source, n, out_mb, wall, rss in rows:
        print(f"{source:<14}{n:>8}{out_mb:>11.0f}{wall:>9.1f}{rss:>13.0f}{rss / out_mb:>12.2f}")


if __name__ == "__main__":
    main()
