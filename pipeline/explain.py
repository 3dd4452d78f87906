"""Stage 5, explain: attribution maps for chosen test images, and how far each method deserves trust.

Samples: ``explain.per_class`` test images per class (seeded), the ``explain.worst`` most
confident false positives and false negatives from evaluate, and, when the phantom carries a
shortcut marker, images with the marker. Each map explains the class the model predicted.
Every method in ``explain.methods`` is then measured (see :mod:`pipeline.xai.trust`):
faithfulness against a random order, Captum infidelity and max-sensitivity, the
model-randomisation sanity check, localisation against lesion masks, and attribution on the
shortcut marker.

Writes ``reports/explain/``: ``metrics.json`` (DVC metrics; per method, with ``sanity_pass``
and warnings), ``samples.json``, ``attributions.npy`` (methods × samples × H × W, or × D × H × W for volumes),
``timing.json`` and ``figures/``: one figure per sample (for volumes, orthogonal slices through
the attribution peak and the lesion centre, and a maximum-intensity projection), ``curves.png`` (deletion/insertion),
``feature_maps.png`` and ``class_images.png`` (the seed's activation and gradient-ascent
visualisations).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.core import paths
from pipeline.core.config import Params
from pipeline.core.dataset import load_meta, load_split, marker_region
from pipeline.core.files import SECONDS_DECIMALS, read_json, rounded, save_npy, staged_dir, write_json
from pipeline.core.runtime import configure_torch, stage_main
from pipeline.modeling.networks import channels_last, folded, images_to_tensor
from pipeline.modeling.package import load_package
from pipeline.reporting.plots import (
    plot_attributions,
    plot_class_images,
    plot_faithfulness,
    plot_feature_maps,
    plot_volume_attributions,
)
from pipeline.xai import attributions, trust

log = logging.getLogger(__name__)

SANITY_STAGES = {"top layer": 1e-9, "all layers": 1.0}


def select_samples(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Up to ``per_class`` test indices per class, drawn with a generator seeded from ``seed``."""
    rng = np.random.default_rng([seed, 5])
    chosen = []
    for k in np.unique(labels):
        members = np.flatnonzero(labels == k)
        chosen.extend(sorted(rng.choice(members, size=min(per_class, len(members)), replace=False).tolist()))
    return np.asarray(chosen, dtype=np.int64)


def choose(test: dict[str, np.ndarray], params: Params, failures: dict[str, list[dict]]) -> list[tuple[int, str]]:
    """(test index, why chosen) for every sample to explain, without repeats, in a fixed order."""
    cfg = params.explain
    picked = [(int(i), "per class") for i in select_samples(test["labels"], cfg.per_class, params.seed)]
    for kind, rows in failures.items():
        picked += [(row["index"], kind.replace("_", " ")[:-1]) for row in rows[:cfg.worst]]
    if "markers" in test:
        with_marker = np.flatnonzero(test["markers"] == 1)
        picks = select_samples(test["labels"][with_marker], cfg.per_class, params.seed + 1)
        picked += [(int(with_marker[j]), "carries the shortcut marker") for j in picks]
    seen, unique = set(), []
    for index, why in picked:
        if index not in seen:
            seen.add(index)
            unique.append((index, why))
    return unique


def measure(model: torch.nn.Module, network: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
            maps: dict[str, np.ndarray], params: Params, masks: np.ndarray | None, marker: np.ndarray | None,
            has_marker: np.ndarray | None) -> tuple[dict[str, Any], dict[str, dict]]:
    """Every trust measurement per method, and the mean deletion/insertion curves; ``model`` is
    ``network`` folded for inference (see :func:`run`), whose layers the sanity check
    re-initialises; ``marker`` is the shortcut marker's pixels
    (:func:`pipeline.core.dataset.marker_region`)."""
    cfg = params.explain
    faith = trust.faithfulness(model, inputs, targets, maps, cfg.faithfulness_steps, params.seed)
    results: dict[str, Any] = {"random": {k: faith["random"][k] for k in ("deletion_auc", "insertion_auc")}}
    randomised = {stage: folded(trust.randomised(network, fraction, params.seed))
                  for stage, fraction in SANITY_STAGES.items()}
    region = marker if has_marker is not None and has_marker.any() else None
    for method in tqdm(cfg.methods, desc="trust", leave=False, disable=None):
        fn = attributions.explainer(method, model, cfg, tuple(inputs.shape[1:]), params.seed)
        row: dict[str, Any] = {k: faith[method][k] for k in ("deletion_auc", "insertion_auc")}
        row["deletion_beats_random"] = bool(row["deletion_auc"] < results["random"]["deletion_auc"])
        row["insertion_beats_random"] = bool(row["insertion_auc"] > results["random"]["insertion_auc"])
        row.update(trust.captum_scores(model, inputs, targets, maps[method], fn, params.seed, cfg.perturbations))
        for stage, copy_ in randomised.items():
            other = attributions.attribute(copy_, inputs, targets, cfg, params.seed, (method,))[method]
            sim = trust.similarity(maps[method], other)
            row[f"randomised_{stage.replace(' ', '_')}_spearman"] = sim["spearman"]
            row[f"randomised_{stage.replace(' ', '_')}_ssim"] = sim["ssim"]
        row["sanity_pass"] = bool(row["randomised_all_layers_spearman"] <= cfg.sanity_threshold)
        if masks is not None:
            row.update(trust.localisation(maps[method], masks))
        if region is not None:
            row["marker_mass"] = rounded(float(np.mean([trust.mass_fraction(m, region, absolute=True)
                                                        for m in maps[method][has_marker == 1]])))
        results[method] = row
    return results, faith


def warnings_for(results: dict[str, Any], params: Params) -> list[str]:
    cfg = params.explain
    found = []
    for method in cfg.methods:
        row, title = results[method], attributions.TITLES[method]
        if not row["sanity_pass"]:
            found.append(f"{title} fails the randomisation sanity check: its maps keep Spearman "
                         f"{row['randomised_all_layers_spearman']:.2f} (> {cfg.sanity_threshold}) after every layer is "
                         "re-initialised, so they do not show what the model learned.")
        if not (row["deletion_beats_random"] or row["insertion_beats_random"]):
            found.append(f"{title} is no more faithful than a random pixel order (neither deletion nor insertion).")
        if row.get("marker_mass", 0) > cfg.shortcut_threshold:
            found.append(f"Shortcut: {title} puts {row['marker_mass']:.0%} of its attribution magnitude on the corner marker "
                         f"(> {cfg.shortcut_threshold:.0%}): the model relies on a confounder, not the lesion.")
    return found


def run(params: Params, prepared: Path = paths.PREPARED, model_path: Path = paths.MODEL,
        failures_path: Path = paths.EVAL_DIR / paths.FAILURES, out_dir: Path = paths.EXPLAIN_DIR) -> dict[str, Any]:
    configure_torch(params.train.threads)
    cfg = params.explain
    meta = load_meta(prepared)
    names = meta["class_names"]
    network = load_package(model_path).network
    # Attributions and trust measures run on the network with batch norm folded into its
    # convolutions: the same function (outputs within 1e-5), one layer's work instead of two.
    # Feature maps and class images show the network as trained.
    model = folded(network)
    test = load_split(prepared, "test")
    chosen = choose(test, params, read_json(failures_path) if failures_path.is_file() else {})
    index = np.array([i for i, _ in chosen])
    inputs = images_to_tensor(np.asarray(test["images"][index]))
    with torch.no_grad():
        probs = torch.softmax(model(inputs), dim=1)
    targets = probs.argmax(dim=1)
    log.info("explaining %d test images with %s", len(index), ", ".join(cfg.methods))
    start = time.perf_counter()
    maps = {}
    seconds: dict[str, float] = {}
    for method in cfg.methods:
        tick = time.perf_counter()
        maps.update(attributions.attribute(model, inputs, targets, cfg, params.seed, (method,)))
        seconds[method] = time.perf_counter() - tick
    masks = test["masks"][index] if "masks" in test else None
    has_marker = test["markers"][index] if "markers" in test else None
    marker = tuple(meta["marker_box"]) if meta.get("marker_box") else None
    region = None if marker is None else marker_region(marker, tuple(inputs.shape[2:]))
    results, faith = measure(model, network, inputs, targets, maps, params, masks, region, has_marker)
    warnings = warnings_for(results, params)
    metrics = {"explain": {m: results[m] for m in cfg.methods},
               "random": results["random"], "warnings": warnings, "n_samples": len(index)}
    samples = []
    with staged_dir(out_dir / paths.FIGURES) as tmp:
        for row, (i, why) in enumerate(chosen):
            sample_id = str(test["ids"][i])
            label, pred = int(test["labels"][i]), int(targets[row])
            title = f"{sample_id} ({why}): true {names[label]}, predicted {names[pred]} (p={float(probs[row, pred]):.3f})"
            shown = {attributions.TITLES[m]: maps[m][row] for m in cfg.methods}
            mask = None if masks is None else masks[row]
            marked = has_marker is not None and has_marker[row]
            if inputs.ndim == 5:
                plot_volume_attributions(channels_last(inputs[row]), shown, title, tmp / f"{sample_id}.png", mask,
                                         region if marked else None)
            else:
                plot_attributions(channels_last(inputs[row]), shown, title, tmp / f"{sample_id}.png", mask,
                                  marker if marked else None)
            samples.append({"id": sample_id, "why": why, "label": names[label], "predicted": names[pred],
                            "probability": rounded(float(probs[row, pred])), "figure": f"{sample_id}.png"})
        plot_faithfulness({attributions.TITLES.get(k, k): v for k, v in faith.items()}, tmp / paths.FAITHFULNESS_PNG)
        plot_feature_maps(attributions.feature_maps(network, inputs[0]), tmp / paths.FEATURE_MAPS_PNG)
        if cfg.class_image_steps:
            shape = tuple(inputs.shape[1:])
            plot_class_images({n: attributions.class_image(network, k, shape, cfg.class_image_steps, params.seed)
                               for k, n in enumerate(names)}, tmp / paths.CLASS_IMAGES_PNG)
    save_npy(out_dir / paths.ATTRIBUTIONS, np.stack([maps[m] for m in cfg.methods]).astype(np.float32))
    write_json(out_dir / paths.SAMPLES, {"methods": list(cfg.methods), "target": "predicted class", "samples": samples,
                                          "settings": {k: v for k, v in vars(cfg).items() if k != "methods"}})
    write_json(out_dir / paths.TIMING, {"seconds_total": rounded(time.perf_counter() - start, SECONDS_DECIMALS),
                                         **{f"maps_per_second_{m}": rounded(len(index) / max(s, 1e-9), SECONDS_DECIMALS)
                                            for m, s in seconds.items()}})
    write_json(out_dir / paths.METRICS, metrics)
    for warning in warnings:
        log.warning(warning)
    return metrics


def main() -> None:
    stage_main(__doc__.splitlines()[0], run)


if __name__ == "__main__":
    main()
