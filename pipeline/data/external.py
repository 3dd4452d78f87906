"""External validation sets (``evaluate.external``): data from elsewhere, read by any source the
pipeline reads and prepared exactly as the development data were (the same ``data.*``
preprocessing, pseudonym salt, DICOM settings and checks), then scored by the frozen model.

A site never reaches training or any choice made on validation: evaluate prepares it into a
temporary folder after the model package is frozen. It must give images of the development
data's size and channels (after preprocessing) and labels of its classes; anything else is one
error that names the site and the file.

``source: phantom`` is the built-in example: a third simulated scanner site, shifted from the
development sites the way a new hospital's scanner is: noisier (``SHIFT``), with fainter
lesions and a higher prevalence, generated with its own seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import DataParams, ExternalParams
from pipeline.core.dataset import SPLITS, load_split
from pipeline.core.errors import PipelineError
from pipeline.core.files import digest_tree, digests_sha256, rounded
from pipeline.data import phantom
from pipeline.data.labels import UNKNOWN
from pipeline.data.labels import counts as label_counts
from pipeline.data.labels import unknown as label_unknown
from pipeline.data.medmnist import fetch_medmnist
from pipeline.data.npz import read_npz
from pipeline.data.sources import Source, from_arrays, load_files, npz_source
from pipeline.data.writing import (  # the development data's own path through preprocessing and checks
    image_digest,
    write_splits,
)

SITE_SPLIT = "test"  # a prepared site is one split of this name
# The phantom's external site: how its scanner and population differ from the development sites'.
SHIFT = {"site_noise": 1.7, "lesion_contrast": 0.8, "prevalence": 0.3}
SEED_OFFSET = 7919  # the site's scans are generated with seed + this: never a development scan


def shifted_phantom(data: DataParams) -> DataParams:
    """The phantom's settings at the external site (``SHIFT``)."""
    settings = data.phantom
    shifted = dataclasses.replace(
        settings, site_noise=(max(settings.site_noise) * SHIFT["site_noise"],),
        lesion_contrast=settings.lesion_contrast * SHIFT["lesion_contrast"], prevalence=SHIFT["prevalence"],
        shortcut=None)
    return dataclasses.replace(data, phantom=shifted)


def load_site(data: DataParams, site: ExternalParams, seed: int, class_names: tuple[str, ...]) -> Source:
    """The site's images as one split (``SITE_SPLIT``) of items, as prepare reads a source, their
    labels positions in the development data's ``class_names``."""
    if site.source == "phantom":
        if data.source != "phantom":
            raise PipelineError(f"source phantom is the phantom's own external site, but the development data are "
                                f"data.source={data.source}")
        shifted = shifted_phantom(data)
        arrays = phantom.generate_split(shifted.phantom, seed + SEED_OFFSET, "test")
        arrays["ids"] = np.array([f"{site.name}-{i:05d}" for i in range(len(arrays["labels"]))])
        del arrays["groups"]  # one site: its own name is the group
        return Source(from_arrays({SITE_SPLIT: arrays}, f"phantom site {site.name}"), list(class_names),
                      {"source": "phantom", "generator": "pipeline.data.phantom", "seed": seed + SEED_OFFSET,
                       "shift": SHIFT}, "generated")
    chosen = SPLITS if site.split == "all" else (site.split,)
    if site.source in ("npz", "medmnist"):
        # The file's chosen splits as they are: no class needs training images at a site, and a
        # file holding only test_images and test_labels is a site (split: test).
        path = Path(site.path) if site.source == "npz" else fetch_medmnist(site.dataset, data.size, Path(data.raw_dir))
        arrays = read_npz(path, chosen)
        merged = {key: np.concatenate([arrays[s][key] for s in chosen]) for key in ("images", "labels", "ids")}
        return npz_source(path, site.source, {SITE_SPLIT: merged}, list(class_names),
                          f"split(s) {', '.join(chosen)} of the input file")
    source = load_files(dataclasses.replace(site.applied_to(data), class_names=class_names), seed, site=True)
    items = [item for split in chosen for item in source.splits.get(split, [])]
    return dataclasses.replace(source, splits={SITE_SPLIT: items})


def image_digests(images: np.ndarray) -> set[str]:
    """:func:`~pipeline.data.writing.image_digest` of each prepared image, as prepare finds duplicates."""
    return {image_digest(image) for image in images}


@contextlib.contextmanager
def prepared_site(data: DataParams, site: ExternalParams, seed: int, meta: dict[str, Any],
                  development: set[str] = frozenset()) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Prepare the site into a temporary folder; yields (its split, as ``load_split`` gives it, and
    a summary: input, n, class counts, prevalence, the number of its images that are exact copies
    of a development image (``development``: their :func:`image_digests`), sha256 of the prepared arrays)."""
    where = f"evaluate.external '{site.name}' ({site.path or site.dataset or site.source})"
    with tempfile.TemporaryDirectory(prefix=f"medcnn-external-{site.name}-") as tmp:
        try:  # the readers' and prepare's own errors, prefixed with the site
            source = load_site(data, site, seed, tuple(meta["class_names"]))
            if not source.splits[SITE_SPLIT]:
                raise PipelineError(f"no images (split {site.split})")
            found = write_splits(source, site.applied_to(data), Path(tmp))
        except PipelineError as error:
            raise PipelineError(f"{where}: {error}") from None
        split = load_split(tmp, SITE_SPLIT)
        shape = (*meta["image_size"], meta["channels"])
        if tuple(split["images"].shape[1:]) != shape:
            raise PipelineError(f"{where}: images are {'x'.join(map(str, split['images'].shape[1:]))} after "
                                f"preprocessing, the model takes {'x'.join(map(str, shape))} (set data.image_size "
                                "and data.channels so that both sources give the same)")
        names = meta["class_names"]
        labels = np.asarray(split["labels"])
        if meta.get("task") == "multilabel":
            if labels.ndim != 2 or labels.shape[1] != len(names) or not np.isin(labels, (UNKNOWN, 0, 1)).all():
                raise PipelineError(f"{where}: labels must be one column per finding of the development data "
                                    f"({', '.join(names)}), each 1, 0 or unknown")
        elif labels.ndim != 1 or labels.min() < 0 or labels.max() >= len(names):
            raise PipelineError(f"{where}: labels must be classes 0..{len(names) - 1} ({', '.join(names)}) of the "
                                "development data")
        counts, unknown = label_counts(labels, names), label_unknown(labels, names) or {}
        summary = {"input": source.provenance, "n": len(labels), "class_counts": counts,
                   # multi-label: of the images where the finding was assessed, as prepare counts them
                   "prevalence": {c: rounded(k / max(len(labels) - unknown.get(c, 0), 1)) for c, k in counts.items()},
                   "patients": found["stats"][SITE_SPLIT]["patients"], "excluded": len(found["unreadable"]),
                   "duplicates": len(found["duplicates"]),
                   "in_development": sum(d in development for d in image_digests(split["images"])),
                   "sha256": digests_sha256(digest_tree(Path(tmp)))}
        yield split, summary
