"""Stage 5, explain: attribution maps for chosen test images, and how far each method deserves trust.

Every map explains the model's own decision, made as ``pipeline.predict`` makes it: the
calibrated probability against the threshold frozen on validation (arg-max for multi-class
tasks). Samples are drawn by outcome, ``explain.per_outcome`` each (seeded): true and false
positives and negatives for binary tasks, correct and misclassified images of each class
otherwise; then the ``explain.worst`` most confident false positives and false negatives from
evaluate, and, when the phantom carries a shortcut marker, images with the marker.
Every method in ``explain.methods`` is then measured (see :mod:`pipeline.xai.trust`):
faithfulness against a random order, Captum infidelity and max-sensitivity and the
model-randomisation sanity check on those samples; localisation on the map of the class the
masks mark (the positive class), for every test image with a mask whatever the decision (at
most ``explain.localisation_images``, seeded), so that it comes with a confidence interval;
and attribution on the shortcut marker.

Writes ``reports/explain/``: ``metrics.json`` (DVC metrics; per method, the numbers and the
verdict of each check, and warnings), ``samples.json`` (the samples and the decision rule they
were explained at), ``attributions.npy`` (methods × samples × H × W, or × D × H × W for
volumes), ``timing.json`` and ``figures/``: one figure per sample (for volumes, orthogonal
slices through the attribution peak and the lesion centre, and a maximum-intensity
projection), ``curves.png`` (deletion/insertion), ``feature_maps.png`` and ``class_images.png``
(the seed's activation and gradient-ascent visualisations).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.core import paths
from pipeline.core.config import Params
from pipeline.core.dataset import load_meta, load_split, marker_region
from pipeline.core.files import SECONDS_DECIMALS, fmt, read_json, rounded, save_npy, staged_dir, write_json
from pipeline.core.runtime import configure_torch, stage_main
from pipeline.modeling.networks import channels_last, folded, images_to_tensor
from pipeline.modeling.package import ModelPackage, load_package
from pipeline.reporting.plots import (
    plot_attributions,
    plot_class_images,
    plot_faithfulness,
    plot_feature_maps,
    plot_volume_attributions,
)
from pipeline.tasks import Task
from pipeline.xai import attributions, trust

log = logging.getLogger(__name__)

SANITY_STAGES = {"top layer": 1e-9, "all layers": 1.0}


def select_samples(kinds: np.ndarray, order: list[str], per_outcome: int, seed: int) -> list[tuple[int, str]]:
    """Up to ``per_outcome`` candidates (positions in ``kinds``) of each outcome, in ``order``,
    drawn with a seeded generator."""
    rng = np.random.default_rng([seed, 5])
    chosen = []
    for kind in order:
        members = np.flatnonzero(kinds == kind)
        picks = rng.choice(members, size=min(per_outcome, len(members)), replace=False) if len(members) else []
        chosen += [(int(i), kind) for i in sorted(picks)]
    return chosen


def choose(task: Task, test: dict[str, np.ndarray], decisions: np.ndarray, positive: int | None, outputs: int,
           params: Params, failures: dict[str, list[dict]]) -> list[tuple[int, str, int]]:
    """(test index, why chosen, output explained) for every map to draw, without repeats, in a
    fixed order: the task's outcomes (:meth:`pipeline.tasks.Task.explain_units`), evaluate's most
    confident mistakes, images with the shortcut marker."""
    cfg = params.explain
    index, kinds, targets = task.explain_units(test["labels"], decisions, positive, outputs)
    picked = [(int(index[u]), why, int(targets[u]))
              for u, why in select_samples(kinds, task.outcome_order(positive), cfg.per_outcome, params.seed)]
    explained = task.explained_output(decisions, outputs)
    for kind, rows in failures.items():
        why = "the fold models disagree most" if kind == paths.DISAGREEMENTS else \
            f"most confident {kind.replace('_', ' ')[:-1]}"
        picked += [(row["index"], why, int(row.get("output", explained[row["index"]]))) for row in rows[:cfg.worst]]
    if "markers" in test:
        with_marker = np.flatnonzero(test["markers"] == 1)
        rng = np.random.default_rng([params.seed + 1, 5])
        picks = rng.choice(with_marker, size=min(cfg.per_outcome, len(with_marker)), replace=False)
        picked += [(int(i), "image with the shortcut marker", int(explained[i])) for i in sorted(picks)]
    seen, unique = set(), []
    for index_, why, target in picked:
        if (index_, target) not in seen:
            seen.add((index_, target))
            unique.append((index_, why, target))
    return unique


def localisation_set(masks: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Test images with a non-empty mask, at most ``limit`` of them (a seeded sample)."""
    masked = np.flatnonzero(masks.reshape(len(masks), -1).any(axis=1))
    if len(masked) > limit:
        masked = np.sort(np.random.default_rng([seed, 17]).choice(masked, size=limit, replace=False))
    return masked


def localise(task: Task, model: torch.nn.Module, test: dict[str, np.ndarray], positive: int, outputs: int,
             params: Params) -> dict[str, tuple[dict[str, dict[str, Any]], int]]:
    """Per localisation unit of the task (the positive class; each finding; the graded lesion):
    every method's localisation of that unit's map against its mask, and on how many images."""
    masks = np.asarray(test["masks"])
    found = {}
    for name, selected, targets, value in task.localisation_units(test["labels"], positive, outputs):
        marked = (masks if value is None else masks == value) * selected.reshape(-1, *[1] * (masks.ndim - 1))
        index = localisation_set(marked, params.explain.localisation_images, params.seed)
        inputs = images_to_tensor(np.asarray(test["images"][index]))
        maps = attributions.attribute(model, inputs, torch.as_tensor(targets[index], dtype=torch.long),
                                      params.explain, params.seed)
        found[name] = ({method: trust.localisation(maps[method], marked[index], params.seed)
                        for method in params.explain.methods}, len(index))
    return found


def measure(model: torch.nn.Module, network: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
            maps: dict[str, np.ndarray], params: Params, marker: np.ndarray | None,
            has_marker: np.ndarray | None) -> tuple[dict[str, Any], dict[str, dict]]:
    """Every trust measurement on the samples per method, and the mean deletion/insertion
    curves; ``model`` is ``network`` folded for inference (see :func:`run`), whose layers the
    sanity check re-initialises; ``marker`` is the shortcut marker's pixels
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
        row["faithful"] = row["deletion_beats_random"] or row["insertion_beats_random"]
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
                         f"{fmt(row['randomised_all_layers_spearman'])} (> {cfg.sanity_threshold}) after every layer is "
                         "re-initialised, so they do not show what the model learned.")
        if not row["faithful"]:
            found.append(f"{title} is no more faithful than a random pixel order (neither deletion nor insertion).")
        for what, located in localisation_rows(row):
            if located.get("localisation_pass") is False:
                found.append(f"{title} does not localise {what}: its pointing game {fmt(located['pointing_game'])} "
                             f"(95% CI {fmt(located['pointing_game_ci_low'])}–{fmt(located['pointing_game_ci_high'])}, "
                             f"{located['n_masks']} images) does not lie above chance "
                             f"({fmt(located['pointing_game_chance'])}).")
        if row.get("marker_mass", 0) > cfg.shortcut_threshold:
            found.append(f"Shortcut: {title} puts {row['marker_mass']:.0%} of its attribution magnitude on the corner marker "
                         f"(> {cfg.shortcut_threshold:.0%}): the model relies on a confounder, not the lesion.")
    return found


def localisation_rows(row: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(what was localised, its numbers) of one method's metrics: the lesions, or each finding."""
    if "localisation_by_finding" in row:
        return [(f"the {name} findings", located) for name, located in row["localisation_by_finding"].items()]
    return [("the lesions", row)] if "pointing_game" in row else []


def decision_rule(package: ModelPackage) -> dict[str, Any]:
    """How the explained decisions were made, for samples.json and the report."""
    names = package.class_names
    if package.threshold is None:
        return {"rule": package.threshold_rule, "temperature": package.temperature}
    if isinstance(package.threshold, list):
        return {"rule": package.threshold_rule, "thresholds": dict(zip(names, package.threshold)),
                "temperatures": dict(zip(names, package.temperature))}
    return {"rule": "threshold", "threshold": package.threshold, "threshold_rule": package.threshold_rule,
            "temperature": package.temperature, "positive_class": names[package.positive_class],
            "negative_class": names[1 - package.positive_class]}


def run(params: Params, prepared: Path = paths.PREPARED, model_path: Path = paths.MODEL,
        failures_path: Path = paths.EVAL_DIR / paths.FAILURES, out_dir: Path = paths.EXPLAIN_DIR) -> dict[str, Any]:
    configure_torch(params.train.threads)
    cfg = params.explain
    meta = load_meta(prepared)
    package = load_package(model_path)
    task, network = package.kind, package.network
    outputs = network.config.num_classes
    positive = package.positive_class if isinstance(package.threshold, float) else None
    # Attributions and trust measures run on the network with batch norm folded into its
    # convolutions: the same function (outputs within 1e-5), one layer's work instead of two.
    # Feature maps and class images show the network as trained.
    model = folded(network)
    test = load_split(prepared, "test")
    scored = package.score(test["images"])
    chosen = choose(task, test, scored.predictions, positive, outputs, params,
                    read_json(failures_path) if failures_path.is_file() else {})
    index = np.array([i for i, _, _ in chosen])
    inputs = images_to_tensor(np.asarray(test["images"][index]))
    targets = torch.from_numpy(np.array([target for _, _, target in chosen], dtype=np.int64))
    probs = scored.probabilities[index]
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
    results, faith = measure(model, network, inputs, targets, maps, params, region, has_marker)
    localised = None
    if "masks" in test:
        localised = localise(task, model, test, package.positive_class, outputs, params)
        for method in cfg.methods:
            if len(localised) == 1:  # the lesions: the method's own numbers
                results[method].update(next(iter(localised.values()))[0][method])
            else:  # one set per finding, and whether the method localises them all
                by_finding = {name: located[method] for name, (located, _) in localised.items()}
                results[method]["localisation_by_finding"] = by_finding
                results[method]["localisation_pass"] = all(row["localisation_pass"] is not False
                                                           for row in by_finding.values())
    warnings = warnings_for(results, params)
    metrics = {"explain": {m: results[m] for m in cfg.methods},
               "random": results["random"], "warnings": warnings, "n_samples": len(index)}
    samples = []
    with staged_dir(out_dir / paths.FIGURES) as tmp:
        repeated = Counter(i for i, _, _ in chosen)
        for row, (i, why, target) in enumerate(chosen):
            sample_id = str(test["ids"][i])
            figure = f"{sample_id}.png" if repeated[i] == 1 else f"{sample_id}-{target}.png"
            label, decided = task.describe_label(test["labels"][i]), task.describe(scored.predictions[i])
            probability = task.explained_probability(probs[row], scored.predictions[i], target)
            explained = "" if task.family == "single" else f", map of {task.output_name(target, outputs)}"
            title = f"{sample_id} ({why}): true {label}, decided {decided}{explained} (p={probability:.3f})"
            shown = {attributions.TITLES[m]: maps[m][row] for m in cfg.methods}
            mask = None if masks is None else masks[row]
            marked = has_marker is not None and has_marker[row]
            if inputs.ndim == 5:
                plot_volume_attributions(channels_last(inputs[row]), shown, title, tmp / figure, mask,
                                         region if marked else None)
            else:
                plot_attributions(channels_last(inputs[row]), shown, title, tmp / figure, mask,
                                  marker if marked else None)
            samples.append({"id": sample_id, "why": why, "label": label, "predicted": decided,
                            "probability": rounded(probability), "figure": figure,
                            **({} if task.family == "single" else {"explained": task.output_name(target, outputs)})})
        plot_faithfulness({attributions.TITLES.get(k, k): v for k, v in faith.items()}, tmp / paths.FAITHFULNESS_PNG)
        plot_feature_maps(attributions.feature_maps(network, inputs[0]), tmp / paths.FEATURE_MAPS_PNG)
        if cfg.class_image_steps:
            shape = tuple(inputs.shape[1:])
            plot_class_images({task.output_name(k, outputs): attributions.class_image(network, k, shape,
                                                                                      cfg.class_image_steps, params.seed)
                               for k in range(outputs)}, tmp / paths.CLASS_IMAGES_PNG)
    save_npy(out_dir / paths.ATTRIBUTIONS, np.stack([maps[m] for m in cfg.methods]).astype(np.float32))
    write_json(out_dir / paths.SAMPLES, {
        "methods": list(cfg.methods), "decision": decision_rule(package), "samples": samples,
        "outcomes_available": {kind: int(n) for kind, n in zip(*np.unique(
            task.explain_units(test["labels"], scored.predictions, positive, outputs)[1], return_counts=True))},
        "localisation": None if localised is None else (
            {"class": next(iter(localised)), "images": next(iter(localised.values()))[1]} if len(localised) == 1
            else {"findings": {name: n for name, (_, n) in localised.items()}}),
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
