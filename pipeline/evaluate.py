"""Stage 4, evaluate: the trained model on the held-out test split, as a clinical study reports it.

Every choice is made on the validation split and frozen before the test split is scored:
the temperature (``evaluate.calibrate``), then the binary operating threshold
(``evaluate.threshold``: Youden, a target sensitivity, or fixed). With ``cv.folds`` the network is
the fold models' ensemble, each member behind the temperature of its own held-out fold, and the
threshold is chosen on the pooled out-of-fold predictions, which also give the cross-validated
estimate (``cross_validation``: pooled and per fold) and the ensemble's disagreement per test
image. The choices are frozen into the model package ``models/model.pt`` (see
:mod:`pipeline.modeling.package`) with the network, the preprocessing and the training images'
intensity statistics, and the test split is scored through that package, exactly as
``pipeline.predict`` scores new images. Test metrics come with 95% bootstrap confidence
intervals (patients resampled when patient ids exist). Classical scikit-learn baselines are
fitted on the same training set and scored the same way. Every model is also attacked for
membership leakage (:mod:`pipeline.evaluation.membership`) and scored on corrupted test images
(:mod:`pipeline.evaluation.corruptions`).

Writes ``models/model.pt`` and ``reports/eval/``:
- ``metrics.json`` (DVC metrics): ``test.<metric>`` with ``_ci_low``/``_ci_high``, the threshold,
  confusion matrices, the precision each count allows, calibration before/after with CIs,
  the decision curve's summary (binary tasks), baselines (and any skipped, with why), the
  CNN compared with each baseline paired on the same test images (``comparisons.<baseline>``:
  DeLong, McNemar, paired bootstrap differences CNN − baseline; :mod:`pipeline.evaluation.comparison`),
  subgroups, out-of-distribution test images, ``privacy_audit``, ``robustness``, and what
  the validation split was used for;
- ``predictions.csv`` and ``val_predictions.csv``: id, true label, calibrated and uncalibrated
  probabilities, decision, out-of-distribution flag: enough for a reviewer to recompute every
  test number, and the temperature and threshold from the validation split;
- DVC plot data ``roc.csv``, ``pr.csv``, ``calibration.csv``, ``decision_curve.csv`` and PNGs of
  ROC, precision-recall, confusion, calibration, decision curve, failure cases and robustness;
  ``failures.json``; ``timing.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from pipeline import tasks
from pipeline.core import paths
from pipeline.core.config import EvaluateParams, Params
from pipeline.core.dataset import SPLITS, ImageRows, load_meta, load_split, load_training_set
from pipeline.core.errors import PipelineError
from pipeline.core.files import SECONDS_DECIMALS, file_digest, rounded, staged_dir, write_csv, write_json
from pipeline.core.runtime import configure_torch, stage_main
from pipeline.data import external
from pipeline.data.labels import strata
from pipeline.data.patient_split import development_folds
from pipeline.evaluation import baselines as classical
from pipeline.evaluation import calibration, comparison, corruptions, membership, sites
from pipeline.evaluation.decision_curve import COLUMNS as DECISION_CURVE_COLUMNS
from pipeline.evaluation.decision_curve import decision_curve
from pipeline.evaluation.metrics import (
    HEADLINE,
    bootstrap_ci,
    bootstrap_headline,
    choose_threshold,
    classification_metrics,
    confusion_matrix,
    normalised,
    per_class_auc,
    precision_of_estimates,
)
from pipeline.modeling import dp_sgd
from pipeline.modeling.checkpoints import load_checkpoint
from pipeline.modeling.networks import Ensemble, predict_proba
from pipeline.modeling.package import ModelPackage, Scores, intensity_reference, save_package
from pipeline.reporting.plots import (
    plot_calibration,
    plot_confusion,
    plot_confusions,
    plot_decision_curve,
    plot_failures,
    plot_forest,
    plot_pr,
    plot_robustness,
    plot_roc,
)
from pipeline.tasks import Task

log = logging.getLogger(__name__)


def score(labels: np.ndarray, probs: np.ndarray, threshold: float | None, cfg: EvaluateParams, seed: int,
          patients: np.ndarray | None = None) -> dict[str, Any]:
    """Headline metrics at ``threshold`` with ``<metric>_ci_low``/``_ci_high`` bootstrap bounds."""
    point = classification_metrics(labels, probs, cfg.positive_class, threshold)
    intervals = bootstrap_headline(labels, probs, cfg.positive_class, threshold, cfg.bootstrap, seed, groups=patients)
    out: dict[str, Any] = {"n": point["n"]}
    for key in HEADLINE:
        low, high = intervals.get(key, (None, None))
        out.update({key: point[key], f"{key}_ci_low": low, f"{key}_ci_high": high})
    return out


def task_score(task: Task, labels: np.ndarray, probs: np.ndarray, threshold: Any, cfg: EvaluateParams, seed: int,
               groups: np.ndarray | None = None) -> dict[str, Any]:
    """A multi-output task's metrics at ``threshold`` with bootstrap bounds, as :func:`score` gives
    the single-label ones; (finding, metric) keys go under ``findings.<finding>``: one MLflow and
    DVC name each."""
    point = task.metrics(labels, probs, threshold)
    intervals = bootstrap_ci(labels, probs, lambda y, p: task.metrics(y, p, threshold), cfg.bootstrap, seed, groups)
    out: dict[str, Any] = {"n": len(labels)}
    for key, value in point.items():
        where, name = (out.setdefault("findings", {}).setdefault(key[0], {}), key[1]) if isinstance(key, tuple) \
            else (out, key)
        low, high = intervals.get(key, (None, None))
        where[name] = rounded(value) if isinstance(value, float) else value
        if name not in ("n", "positives"):
            where.update({f"{name}_ci_low": low, f"{name}_ci_high": high})
    return out


def failure_cases(labels: np.ndarray, probs: np.ndarray, preds: np.ndarray, ids: np.ndarray, names: list[str],
                  positive: int, k: int) -> dict[str, list[dict[str, Any]]]:
    """The most confident mistakes: false positives and false negatives (binary) or errors (multi-class).

    The score is P(positive) for binary tasks (high for the worst false positives, low for the
    worst false negatives) and the predicted class's probability otherwise.
    """
    binary = probs.shape[1] == 2
    scores = probs[:, positive] if binary else probs.max(axis=1)

    def rows(index: np.ndarray, worst_first: np.ndarray) -> list[dict[str, Any]]:
        return [{"index": int(i), "id": str(ids[i]), "label": names[labels[i]], "predicted": names[preds[i]],
                 "score": rounded(float(scores[i]))} for i in index[np.argsort(worst_first, kind="stable")][:k]]

    if binary:
        fp = np.flatnonzero((preds == positive) & (labels != positive))
        fn = np.flatnonzero((preds != positive) & (labels == positive))
        return {"false_positives": rows(fp, -scores[fp]), "false_negatives": rows(fn, scores[fn])}
    wrong = np.flatnonzero(preds != labels)
    return {"errors": rows(wrong, -scores[wrong])}


def imbalanced_report(labels: np.ndarray, preds: np.ndarray, names: list[str]) -> dict[str, dict[str, float]]:
    """imblearn's per-class precision, recall, specificity, F1, G-mean, IBA and support, by class name."""
    from imblearn.metrics import classification_report_imbalanced

    report = classification_report_imbalanced(labels, preds, labels=list(range(len(names))), output_dict=True,
                                              zero_division=0)
    # imblearn keys the classes by their label as a string ("0", "1", ...).
    return {name: {k: rounded(float(v)) for k, v in report[str(k_)].items()} for k_, name in enumerate(names)
            if str(k_) in report}


def curves(task: Task, labels: np.ndarray, probs: np.ndarray, positive: int):
    """(name, ROC (fpr, tpr, thr), PR (recall, precision)) of each of the task's curves
    (:meth:`pipeline.tasks.Task.curves`: the positive class, each class or grade, each finding)."""
    for name, positive_, score_ in task.curves(labels, probs, positive):
        fpr, tpr, thr = roc_curve(positive_, score_)
        precision, recall, _ = precision_recall_curve(positive_, score_)
        yield name, (fpr, tpr, np.minimum(thr, 1.0)), (recall, precision)


def freeze(params: Params, task: Task, network_path: Path, prepared: Path, meta: dict[str, Any],
           val: dict[str, np.ndarray]) -> tuple[ModelPackage, dict[str, Any], Scores]:
    """The model package: the trained network with every choice made on validation, frozen before
    the test; the images those choices were made on (the validation split; with ``cv.folds`` the
    development images, each scored by the fold model that never saw it: :func:`out_of_fold`) and
    their scores as the package scores them."""
    cfg = params.evaluate
    network, trained = load_checkpoint(network_path)
    if isinstance(network, Ensemble):
        # Each member is calibrated by the temperature of its own held-out fold inside the
        # ensemble; the pooled out-of-fold predictions choose the ensemble's threshold.
        chosen, raw, probs = out_of_fold(params, task, network, prepared)
        temperature = 1.0
    else:
        chosen = val
        raw = predict_proba(network, val["images"], cfg.batch_size, activation=task.probabilities)
        temperature = task.fit_temperature(cfg.calibrate, val["labels"], raw)
        probs = task.calibrate(raw, temperature)
    threshold = task.thresholds(cfg.threshold, chosen["labels"], probs, cfg.positive_class)
    log.info("%s choices: temperature %s, threshold %s (%s)", "out-of-fold" if params.cv.k else "validation",
             temperature, threshold, task.threshold_rule(cfg.threshold, threshold))
    package = ModelPackage(
        network=network, class_names=meta["class_names"], positive_class=cfg.positive_class, temperature=temperature,
        threshold=threshold, threshold_rule=task.threshold_rule(cfg.threshold, threshold),
        task=trained.get("task"),
        preprocessing={**meta["preprocessing"], "input_size": list(meta["image_size"]), "input_channels": meta["channels"]},
        intensity=intensity_reference(load_split(prepared, "train")["images"]),
        provenance={"data_sha256": meta["arrays_sha256"], "network_sha256": file_digest(network_path),
                    "privacy": trained.get("privacy")})
    scored = Scores(probs, raw, task.decide(probs, threshold, cfg.positive_class),
                    package.out_of_distribution(chosen["images"]))
    return package, chosen, scored


def out_of_fold(params: Params, task: Task, ensemble: Ensemble, prepared: Path
                ) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """``cv.folds``: the development images (train + val) with their fold, each scored by the one
    member that held its fold out: (the images as a split, uncalibrated and calibrated
    probabilities). The folds are recomputed from the prepared data, as the fold stages drew them."""
    dev, folds = development_folds(prepared, params.cv.k, params.seed)
    raw = np.zeros((len(folds), ensemble.config.num_classes))
    probs = np.zeros_like(raw)
    for number, member, temperature in zip(params.cv.folds, ensemble.members, ensemble.temperatures.tolist()):
        rows = np.flatnonzero(folds == number)
        raw[rows] = predict_proba(member, Rows(dev["images"], rows), params.evaluate.batch_size,
                                  activation=task.probabilities)
        probs[rows] = task.calibrate(raw[rows], temperature)
    return {**dev, "folds": folds}, raw, probs


CV_METRICS = ("roc_auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy")


def cross_validation(params: Params, task: Task, chosen: dict[str, Any], scored: Scores, threshold: float | None
                     ) -> dict[str, Any]:
    """The cross-validated estimate from the out-of-fold predictions: pooled over every
    development image at the ensemble's threshold, with bootstrap CIs (patients resampled), and
    per fold at that fold's own threshold (chosen on its held-out images, as the fold stage did),
    with the mean and standard deviation across folds."""
    cfg = params.evaluate
    labels, probs, folds = chosen["labels"], scored.probabilities, chosen["folds"]
    per_fold = {}
    for number in params.cv.folds:
        rows = folds == number
        own = task.thresholds(cfg.threshold, labels[rows], probs[rows], cfg.positive_class)
        found = classification_metrics(labels[rows], probs[rows], cfg.positive_class, own)
        per_fold[str(number)] = {"n": int(rows.sum()), "threshold": own,
                                 **{key: rounded(found[key]) for key in CV_METRICS if found.get(key) is not None}}
    keys = [key for key in CV_METRICS if all(key in row for row in per_fold.values())]
    return {"folds": params.cv.k, "images": len(labels),
            "pooled": score(labels, probs, threshold, cfg, params.seed, chosen.get("patients")),
            "per_fold": per_fold,
            "mean": {key: rounded(float(np.mean([row[key] for row in per_fold.values()]))) for key in keys},
            "sd": {key: rounded(float(np.std([row[key] for row in per_fold.values()], ddof=1))) for key in keys}}


def disagreement(params: Params, task: Task, package: ModelPackage, test: dict[str, Any], scored: Scores,
                 thresholds: list[float | None]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """How much the fold models disagree on each test image, an uncertainty of the ensemble: the
    standard deviation across members of their calibrated probabilities (of the positive class;
    multi-class: averaged over classes), and whether their decisions differ (each at its own
    fold's ``thresholds``). Returns the summary and the test images they disagree on most, worst first."""
    cfg = params.evaluate
    ensemble: Ensemble = package.network
    members = np.stack([task.calibrate(predict_proba(m, test["images"], cfg.batch_size, activation=task.probabilities),
                                       t) for m, t in zip(ensemble.members, ensemble.temperatures.tolist())], axis=1)
    binary = package.threshold is not None
    spread = members[:, :, cfg.positive_class].std(axis=1) if binary else members.std(axis=1).mean(axis=1)
    decisions = np.stack([task.decide(members[:, i], t, cfg.positive_class) for i, t in enumerate(thresholds)], axis=1)
    differ = (decisions != decisions[:, :1]).any(axis=1)
    names, worst = package.class_names, np.argsort(-spread, kind="stable")[:cfg.failure_cases]
    rows = [{"index": int(i), "id": str(test["ids"][i]), "label": names[test["labels"][i]],
             "predicted": names[scored.predictions[i]], "score": rounded(float(spread[i])),
             "members": [rounded(float(p)) for p in (members[i, :, cfg.positive_class] if binary
                                                      else members[i, :, scored.predictions[i]])]}
            for i in worst]
    summary = {"mean_sd": rounded(float(spread.mean())), "max_sd": rounded(float(spread.max())),
               "decisions_differ": rounded(float(differ.mean())), "images": len(spread),
               "measure": "sd of P(" + names[cfg.positive_class] + ")" if binary else "mean sd of class probabilities"}
    return summary, rows


def privacy_audit(params: Params, pool: tuple[Any, np.ndarray], package: ModelPackage,
                  non_members: tuple[np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray],
                  non_members_from: str) -> dict[str, Any]:
    """The membership audit (:mod:`pipeline.evaluation.membership`): a seeded sample of the
    training images ``pool`` (images, labels) as large as the non-members (never trained on,
    from the same population: the validation split, or with ``cv.folds``, where every
    development image trained some member, a seeded half of the test split), a reference set
    for the attacker (the test split, or its other half), with the δ of the training's guarantee."""
    images, labels = pool
    rng = np.random.default_rng([params.seed, 31])
    pick = np.sort(rng.choice(len(labels), min(len(labels), len(non_members[1])), replace=False))
    members = package.uncalibrated(images[pick], params.evaluate.batch_size)
    view = package.kind.membership_view  # (probabilities, labels) as the attacks read them
    result = membership.audit(view(members, labels[pick]), view(*non_members), view(*reference),
                              dp_sgd.delta_for(params, len(labels)), params.evaluate.bootstrap, params.seed)
    result["non_members_from"] = non_members_from
    log.info("membership audit: attack ROC AUC %s (loss), %s (calibrated)", result["attacks"]["loss"]["roc_auc"],
             result["attacks"]["calibrated"]["roc_auc"])
    return result


def audit_sets(params: Params, prepared: Path, chosen: dict[str, Any], chosen_scored: Scores, test_raw: np.ndarray,
               y_test: np.ndarray) -> dict[str, Any]:
    """:func:`privacy_audit`'s inputs: members from the training split and the validation split
    as non-members; with ``cv.folds``, members from the development images and the test split
    halved (seeded) into non-members and the attacker's reference."""
    if not params.cv.k:
        train = load_split(prepared, "train")
        return {"pool": (train["images"], train["labels"]), "reference": (test_raw, y_test),
                "non_members": (chosen_scored.uncalibrated, chosen["labels"]),
                "non_members_from": "the validation split"}
    order = np.random.default_rng([params.seed, 59]).permutation(len(y_test))
    half, rest = np.sort(order[:len(order) // 2]), np.sort(order[len(order) // 2:])
    return {"pool": (chosen["images"], chosen["labels"]), "non_members": (test_raw[half], y_test[half]),
            "reference": (test_raw[rest], y_test[rest]), "non_members_from": "a seeded half of the test split"}


def robustness_sample(cfg: EvaluateParams, n: int, seed: int, stream: int) -> np.ndarray:
    """Sorted rows of a seeded sample of at most ``evaluate.robustness_images`` of ``n`` images
    (``stream``: each use draws its own)."""
    rng = np.random.default_rng([seed, stream])
    return np.sort(rng.choice(n, min(n, cfg.robustness_images), replace=False))


def robustness(cfg: EvaluateParams, seed: int, package: ModelPackage, images: ImageRows, labels: np.ndarray
               ) -> dict[str, Any]:
    """The task's headline metrics (ROC AUC and accuracy at the package's frozen decision; and
    kappa for grades) of a seeded sample of at most
    ``evaluate.robustness_images`` test images, clean and under every corruption and severity
    (:mod:`pipeline.evaluation.corruptions`), and the mean drop from clean."""
    pick = robustness_sample(cfg, len(labels), seed, 37)
    clean_images, y = np.asarray(images[pick]), labels[pick]

    def measure(x: np.ndarray) -> dict[str, float | None]:
        probs = package.calibrated(package.uncalibrated(x, cfg.batch_size))
        return package.kind.headline(y, probs, package.threshold, cfg.positive_class)

    result: dict[str, Any] = {"images": len(y), "clean": measure(clean_images), "corruptions": {}}
    for number, name in enumerate(cfg.corruptions):
        result["corruptions"][name] = {
            str(severity): measure(corruptions.corrupt(clean_images, name, severity,
                                                       np.random.default_rng([seed, 41, number, severity])))
            for severity in cfg.severities}
    for key in result["clean"]:
        drops = [result["clean"][key] - row[key] for levels in result["corruptions"].values()
                 for row in levels.values() if row[key] is not None and result["clean"][key] is not None]
        result[f"mean_{key}_drop"] = rounded(float(np.mean(drops))) if drops else None
    return result


def decision_stability(cfg: EvaluateParams, seed: int, package: ModelPackage, images: ImageRows,
                       decisions: np.ndarray) -> dict[str, float]:
    """The share of (a seeded sample of at most ``evaluate.robustness_images``) decisions that
    each mild corruption (severity 1) leaves unchanged, and their mean."""
    if not cfg.corruptions:
        return {}
    pick = robustness_sample(cfg, len(decisions), seed, 47)
    clean = np.asarray(images[pick])
    out = {}
    for number, name in enumerate(cfg.corruptions):
        shifted = corruptions.corrupt(clean, name, 1, np.random.default_rng([seed, 53, number]))
        out[name] = rounded(float(np.mean(package.score(shifted, cfg.batch_size).predictions == decisions[pick])))
    out["mean"] = rounded(float(np.mean(list(out.values()))))
    return out


def recalibrated(cfg: EvaluateParams, seed: int, task: Task, package: ModelPackage, labels: np.ndarray,
                 scored: Scores, fraction: float, patients: np.ndarray | None,
                 scorer: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """Temperature and threshold refitted on a seeded, stratified ``fraction`` of a site's images;
    the rest scored both ways: as frozen (untouched) and recalibrated, side by side."""
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(labels))
    fit, rest = train_test_split(rows, train_size=fraction, stratify=strata(labels), random_state=seed)
    fit, rest = np.sort(fit), np.sort(rest)
    temperature = task.fit_temperature(cfg.calibrate, labels[fit], scored.uncalibrated[fit])
    threshold = task.thresholds(cfg.threshold, labels[fit], task.calibrate(scored.uncalibrated[fit], temperature),
                                cfg.positive_class)
    groups = None if patients is None else patients[rest]
    return {"fraction": fraction, "fitted_on": len(fit), "scored_on": len(rest), "temperature": temperature,
            "threshold": threshold,
            "untouched": scorer(labels[rest], scored.probabilities[rest], package.threshold, groups),
            "recalibrated": scorer(labels[rest], task.calibrate(scored.uncalibrated[rest], temperature), threshold,
                                   groups)}


def external_validation(params: Params, meta: dict[str, Any], task: Task, package: ModelPackage,
                        test_metrics: dict[str, Any], prepared: Path, out_dir: Path) -> dict[str, Any]:
    """Each ``evaluate.external`` site (:mod:`pipeline.data.external`) scored by the frozen package:
    metrics with CIs at the frozen threshold, calibration-in-the-large and slope, prevalence,
    the share flagged out of distribution, decision stability, an optional recalibration, the count
    of exact copies of development images; across the internal test split and the sites, the
    heterogeneity of ROC AUC and a forest plot. Returns ``{"external": …}`` for evaluate's
    metrics, or nothing when no site is listed (``sites.csv`` then holds the internal row alone)."""
    cfg = params.evaluate

    def scorer(labels: np.ndarray, probs: np.ndarray, threshold: Any, groups: np.ndarray | None) -> dict[str, Any]:
        if task.family == "single":
            return score(labels, probs, threshold, cfg, params.seed, groups)
        return task_score(task, labels, probs, threshold, cfg, params.seed, groups)

    found: dict[str, Any] = {}
    development = set().union(*[external.image_digests(load_split(prepared, s)["images"]) for s in SPLITS]) \
        if cfg.external else set()
    with staged_dir(out_dir) as staged:
        for site in cfg.external:
            with external.prepared_site(params.data, site, params.seed, meta, development) as (split, summary):
                if summary["in_development"]:
                    log.warning("external site %s: %d image(s) are exact copies of development images",
                                site.name, summary["in_development"])
                labels, patients = np.asarray(split["labels"]), split.get("patients")
                scored = package.score(split["images"], cfg.batch_size)
                pairs = task.calibration_pairs(labels, scored.probabilities, cfg.positive_class)
                row = {**summary, "test": scorer(labels, scored.probabilities, package.threshold, patients),
                       # multi-label: over the assessed (image, finding) pairs, resampled as pairs
                       "calibration": sites.transport_calibration(
                           *pairs, cfg.bootstrap, params.seed, patients if len(pairs[0]) == len(labels) else None),
                       "out_of_distribution": rounded(float(scored.out_of_distribution.mean())),
                       "decision_stability": decision_stability(cfg, params.seed, package, split["images"],
                                                                scored.predictions)}
                if task.name == "multilabel":  # how many each finding's frozen threshold flags, against presence
                    row["flagged"] = {name: rounded(float(scored.predictions[labels[:, c] >= 0, c].mean()))
                                      for c, name in enumerate(task.names)}
                if site.recalibrate:
                    try:
                        row["recalibrated"] = recalibrated(cfg, params.seed, task, package, labels, scored,
                                                           site.recalibrate, patients, scorer)
                    except ValueError as error:  # scikit-learn's: too few images of a class to stratify
                        raise PipelineError(f"evaluate.external '{site.name}': recalibrate {site.recalibrate} cannot "
                                            f"be drawn from its {len(labels)} images: {error}") from None
                write_predictions(staged / f"{site.name}.csv", task, split, scored)
            found[site.name] = row
            log.info("external site %s: %d images, ROC AUC %s (%s – %s)", site.name, row["n"], row["test"]["roc_auc"],
                     row["test"]["roc_auc_ci_low"], row["test"]["roc_auc_ci_high"])
        forest = [(sites.INTERNAL, test_metrics.get("roc_auc"), test_metrics.get("roc_auc_ci_low"),
                   test_metrics.get("roc_auc_ci_high"))]
        forest += [(name, r["test"]["roc_auc"], r["test"]["roc_auc_ci_low"], r["test"]["roc_auc_ci_high"])
                   for name, r in found.items()]
        write_csv(staged / paths.SITES_CSV, ["site", "n", "roc_auc", "ci_low", "ci_high"],
                  [[name, test_metrics["n"] if name == sites.INTERNAL else found[name]["n"], *values]
                   for name, *values in forest])
        spread = sites.heterogeneity({name: tuple(values) for name, *values in forest})
        if found:
            plot_forest(forest, spread["pooled"] if spread else None, "ROC AUC (95% CI)", staged / paths.FOREST_PNG)
    return {"external": {"sites": found, "heterogeneity": {"roc_auc": spread}}} if found else {}


def run(params: Params, prepared: Path = paths.PREPARED, balanced: Path = paths.BALANCED,
        network_path: Path = paths.NETWORK, out_dir: Path = paths.EVAL_DIR,
        package_path: Path = paths.MODEL) -> dict[str, Any]:
    """Evaluate the task of the prepared data: one class per image (:func:`evaluate_single`), or
    findings and grades (:func:`evaluate_multioutput`)."""
    configure_torch(params.train.threads)
    meta = load_meta(prepared)
    task = tasks.for_data(meta.get("task"), meta["class_names"])
    flow = {"single": evaluate_single, "multioutput": evaluate_multioutput}[task.family]
    return flow(params, task, meta, prepared, balanced, network_path, out_dir, package_path)


def evaluate_single(params: Params, task: Task, meta: dict[str, Any], prepared: Path, balanced: Path,
                    network_path: Path, out_dir: Path, package_path: Path) -> dict[str, Any]:
    """Binary and multi-class tasks, with the binary study's full set: sensitivity, specificity,
    PPV/NPV with CIs, the decision curve, imblearn's per-class report, the classical baselines."""
    cfg = params.evaluate
    names = meta["class_names"]
    positive = cfg.positive_class
    if positive >= len(names):
        raise PipelineError(f"evaluate.positive_class={positive} but the data have {len(names)} classes")
    val, test = load_split(prepared, "val"), load_split(prepared, "test")
    y_val, y_test = val["labels"], test["labels"]

    # 1. Choices on validation only (cv.folds: out-of-fold), frozen into the model package before
    # the test split is scored.
    package, chosen, val_scored = freeze(params, task, network_path, prepared, meta, val)
    temperature, threshold = package.temperature, package.threshold
    val_probs = val_scored.probabilities

    # 2. Test, scored once, exactly as pipeline.predict scores an image.
    patients = test.get("patients")
    scored = package.score(test["images"], cfg.batch_size)
    raw, probs, preds = {"test": scored.uncalibrated}, {"test": scored.probabilities}, scored.predictions
    matrix = confusion_matrix(y_test, preds, len(names))
    test_metrics = {
        **score(y_test, probs["test"], threshold, cfg, params.seed, patients),
        "threshold": threshold, "threshold_rule": cfg.threshold if threshold is not None else "argmax",
        "positive_class": names[positive] if threshold is not None else None,
        "confusion_matrix": matrix, "confusion_matrix_normalized": normalised(matrix),
    }
    if len(names) > 2:
        test_metrics["roc_auc_per_class"] = per_class_auc(y_test, probs["test"], names)
    test_metrics["per_class_imbalanced"] = imbalanced_report(y_test, preds, names)
    test_metrics["precision"] = precision_of_estimates(matrix, positive if threshold is not None else None, names)
    calib = {"method": cfg.calibrate, "temperature": temperature}
    if params.cv.k:  # each member behind its own fold's temperature, inside the ensemble
        calib["member_temperatures"] = [rounded(t) for t in package.network.temperatures.tolist()]
    for when, p in (("before", raw["test"]), ("after", probs["test"])):
        overall = classification_metrics(y_test, p, positive, threshold)
        calib[when] = {**calibration.summarise_with_ci(y_test, p, positive, cfg.bootstrap, params.seed, patients),
                       "brier": overall["brier"], "log_loss": overall["log_loss"]}
    result: dict[str, Any] = {"test": test_metrics, "calibration": calib, "val": {
        "roc_auc": classification_metrics(chosen["labels"], val_probs, positive, threshold)["roc_auc"],
        "n": len(chosen["labels"]), "used_for": validation_uses(cfg, threshold, params.cv.k)},
        "out_of_distribution": {"test_flagged": int(scored.out_of_distribution.sum()),
                                "test_ids": [str(i) for i in test["ids"][scored.out_of_distribution]]}}
    curve = None
    if threshold is not None:  # binary: is acting on the model better than treating all or none?
        curve, result["decision_curve"] = decision_curve(y_test, probs["test"], positive, threshold)

    if params.cv.k:  # the cross-validated estimate, and how much the fold models disagree on test images
        result["cross_validation"] = cross_validation(params, task, chosen, val_scored, threshold)
        own = [row["threshold"] for row in result["cross_validation"]["per_fold"].values()]
        result["cross_validation"]["disagreement"], disagreed = disagreement(params, task, package, test, scored, own)

    # 3. Membership inference audit: training members against never-trained-on non-members.
    audited = audit_sets(params, prepared, chosen, val_scored, scored.uncalibrated, y_test)
    result["privacy_audit"] = privacy_audit(params, package=package, **audited)

    # 4. Robustness: a sample of the test split under each corruption, at the frozen threshold.
    result["robustness"] = robustness(cfg, params.seed, package, test["images"], y_test)

    # 5. Subgroups (e.g. scanner site) with their own intervals.
    if "groups" in test:
        result["subgroups"] = {meta.get("group_name") or "group": {
            str(g): score(y_test[test["groups"] == g], probs["test"][test["groups"] == g], threshold, cfg,
                          params.seed, None if patients is None else patients[test["groups"] == g])
            for g in np.unique(test["groups"])}}

    # 6. External sites: prepared like the development data, scored once by the frozen package.
    result.update(external_validation(params, meta, task, package, test_metrics, prepared, out_dir / paths.EXTERNAL))

    # 7. Classical baselines on the same training set, choices on validation the same way.
    timing: dict[str, float] = {}
    baseline_probs = {}
    if cfg.baselines:
        training = load_training_set(prepared, balanced)
        result["baselines"] = {}
        if classical.pooling(training.shape) > 1:  # volumes: what the baselines saw, for the report
            result["baseline_voxel_pooling"] = classical.pooling(training.shape)
        for name in cfg.baselines:
            if name == "svm" and len(training) > cfg.svm_max_train:
                why = f"{len(training)} training images > evaluate.svm_max_train ({cfg.svm_max_train})"
                log.info("skipping svm: %s", why)
                result.setdefault("baselines_skipped", {})[name] = why
                continue
            out, timing[f"baseline_{name}_seconds"] = classical.fit_predict(
                name, training, training.labels, np.asarray(training.weights)[training.labels], val["images"], y_val,
                test["images"], params.seed, params.train.threads, cfg.baseline_max_train)
            t = choose_threshold(cfg.threshold, y_val, out["val"], positive)
            result["baselines"][name] = {**score(y_test, out["test"], t, cfg, params.seed, patients), "threshold": t}
            baseline_probs[name] = out["test"]
            # Paired on the same test images: CNN − baseline, net benefit valued at the CNN's threshold.
            result.setdefault("comparisons", {})[name] = comparison.compare(
                y_test, out["test"], probs["test"], t, threshold, positive, cfg.bootstrap, params.seed, patients,
                valued_at=threshold)

    save_package(package_path, package)
    write_outputs(out_dir, task, result, test, scored, names, positive, baseline_probs, cfg, timing,
                  {paths.DISAGREEMENTS: disagreed} if params.cv.k else {})
    write_predictions(out_dir / paths.VAL_PREDICTIONS, task, chosen, val_scored)
    write_csv(out_dir / paths.DECISION_CURVE_CSV, list(DECISION_CURVE_COLUMNS), [list(r.values()) for r in curve or []])
    plot_decision_curve(curve or [], threshold, out_dir / paths.DECISION_CURVE_PNG)
    log.info("test: %s", ", ".join(f"{k} {test_metrics[k]}" for k in ("roc_auc", "accuracy", "sensitivity", "specificity")))
    return result


def evaluate_multioutput(params: Params, task: Task, meta: dict[str, Any], prepared: Path, balanced: Path,
                         network_path: Path, out_dir: Path, package_path: Path) -> dict[str, Any]:
    """Multi-label findings and ordinal grades: the task's metrics (per finding, or kappa, MAE,
    accuracy within one grade) with bootstrap CIs at the frozen decisions, calibration, the
    out-of-distribution flags, the membership audit, subgroups, robustness and the classical
    baselines (one-vs-rest per finding), as :func:`evaluate_single` reports them."""
    cfg = params.evaluate
    val, test = load_split(prepared, "val"), load_split(prepared, "test")
    y_val, y_test = val["labels"], test["labels"]
    package, _, val_scored = freeze(params, task, network_path, prepared, meta, val)
    scored = package.score(test["images"], cfg.batch_size)
    patients = test.get("patients")

    def with_ci(labels: np.ndarray, probs: np.ndarray, groups: np.ndarray | None,
                threshold: Any = package.threshold) -> dict[str, Any]:
        return task_score(task, labels, probs, threshold, cfg, params.seed, groups)

    test_metrics = {**with_ci(y_test, scored.probabilities, patients), "threshold": package.threshold,
                    "threshold_rule": package.threshold_rule, "temperature": package.temperature}
    confusions = task.confusions(y_test, scored.predictions)  # grades: one matrix; findings: one each
    for title, matrix, _ in confusions:
        (test_metrics["findings"][title] if title else test_metrics).update(
            confusion_matrix=matrix, confusion_matrix_normalized=normalised(matrix))
    result: dict[str, Any] = {
        "task": task.name, "test": test_metrics,
        "val": {task.selection: rounded(task.epoch_scores(y_val, val_scored.probabilities)[task.selection]),
                "n": len(y_val),
                "used_for": validation_uses(cfg, package.threshold)},
        "out_of_distribution": {"test_flagged": int(scored.out_of_distribution.sum()),
                                "test_ids": [str(i) for i in test["ids"][scored.out_of_distribution]]},
        "privacy_audit": privacy_audit(params, package=package, **audit_sets(params, prepared, val, val_scored,
                                                                             scored.uncalibrated, y_test)),
        "robustness": robustness(cfg, params.seed, package, test["images"], y_test),
    }
    if "groups" in test:
        result["subgroups"] = {meta.get("group_name") or "group": {
            str(g): with_ci(y_test[test["groups"] == g], scored.probabilities[test["groups"] == g],
                            None if patients is None else patients[test["groups"] == g])
            for g in np.unique(test["groups"])}}

    timing: dict[str, float] = {}
    if cfg.baselines:
        training = load_training_set(prepared, balanced)
        result["baselines"] = {}
        for name in cfg.baselines:
            if name == "svm" and len(training) > cfg.svm_max_train:
                result.setdefault("baselines_skipped", {})[name] = (
                    f"{len(training)} training images > evaluate.svm_max_train ({cfg.svm_max_train})")
                continue
            (val_probs_b, test_probs_b), timing[f"baseline_{name}_seconds"] = task_baseline(
                task, name, training, val, test["images"], params)
            chosen = task.thresholds(cfg.threshold, y_val, val_probs_b, cfg.positive_class)
            result["baselines"][name] = {**with_ci(y_test, test_probs_b, patients, chosen), "threshold": chosen}
    result.update(external_validation(params, meta, task, package, test_metrics, prepared, out_dir / paths.EXTERNAL))
    save_package(package_path, package)
    write_predictions(out_dir / paths.PREDICTIONS, task, test, scored)
    write_predictions(out_dir / paths.VAL_PREDICTIONS, task, val, val_scored)
    write_curves(out_dir, task, y_test, scored.probabilities, cfg.positive_class, {})
    result["calibration"] = {"method": cfg.calibrate, "temperature": package.temperature,
                             **{when: calibration.summarise(*task.calibration_pairs(y_test, p, cfg.positive_class))
                                for when, p in (("before", scored.uncalibrated), ("after", scored.probabilities))}}
    reliability = write_reliability(out_dir, task, y_test, scored, cfg.positive_class)
    write_csv(out_dir / paths.DECISION_CURVE_CSV, list(DECISION_CURVE_COLUMNS), [])
    failures = task.failures(y_test, scored.probabilities, scored.predictions, test["ids"], cfg.failure_cases)
    write_json(out_dir / paths.FAILURES, failures)
    write_json(out_dir / paths.METRICS, result)
    write_json(out_dir / paths.TIMING, {k: rounded(v, SECONDS_DECIMALS) for k, v in timing.items()})
    plot_confusions(confusions, out_dir / paths.CONFUSION_PNG)
    plot_calibration(reliability, result["calibration"], out_dir / paths.CALIBRATION_PNG)
    plot_failures(test["images"], failures, out_dir / paths.FAILURES_PNG)
    plot_robustness(result["robustness"], out_dir / paths.ROBUSTNESS_PNG)
    plot_decision_curve([], None, out_dir / paths.DECISION_CURVE_PNG)
    log.info("test (%s): %s", task.name, ", ".join(f"{k} {test_metrics[k]}" for k in task.headline(
        y_test, scored.probabilities, package.threshold, cfg.positive_class)))
    return result


class Rows:
    """Some rows of an image array (or training set), indexed like the whole: ``rows[a:b]`` and
    ``rows[[i, j]]`` read only those rows, as the baselines read their inputs in chunks."""

    def __init__(self, images: Any, index: np.ndarray) -> None:
        self.images, self.index = images, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.images[self.index[key]])


def task_baseline(task: Task, name: str, training: Any, val: dict[str, Any], test_images: Any, params: Params
                  ) -> tuple[tuple[np.ndarray, np.ndarray], float]:
    """A classical baseline for the task: validation and test probabilities shaped as the CNN's,
    and the seconds it took. Each of the task's problems (one, or one per finding: one-vs-rest
    on the images where the finding was assessed) is fitted on its own."""
    cfg = params.evaluate
    shape = (len(val["labels"]), len(test_images))
    probs = {"val": None, "test": None}
    seconds = 0.0
    for train_rows, y_train, weights, val_rows, y_val, column in task.baseline_problems(
            training.labels, np.asarray(training.weights), val["labels"]):
        out, spent = classical.fit_predict(name, Rows(training, train_rows), y_train, weights,
                                           Rows(val["images"], val_rows), y_val, test_images, params.seed,
                                           params.train.threads, cfg.baseline_max_train)
        seconds += spent
        if column is None:
            return (out["val"], out["test"]), seconds
        for split, n in zip(("val", "test"), shape):
            if probs[split] is None:
                probs[split] = np.full((n, task.k), 0.5)
        probs["val"][val_rows, column] = out["val"][:, 1]
        probs["test"][:, column] = out["test"][:, 1]
    return (probs["val"], probs["test"]), seconds


def validation_uses(cfg: EvaluateParams, threshold: float | None, folds: int = 0) -> list[str]:
    """Every choice the validation split (``cv.folds``: each held-out fold, and the pooled
    out-of-fold predictions) made or served, in order: the report's warning about estimates
    made on it rests on this list."""
    if folds:
        uses = ["choosing each fold model's training epoch (early stopping) on its own held-out fold"]
        if cfg.calibrate != "none":
            uses.append(f"fitting each fold model's {cfg.calibrate} on its own held-out fold")
        if threshold is not None and not cfg.threshold.startswith("fixed"):
            uses.append(f"choosing the ensemble's threshold ({cfg.threshold}) on the pooled out-of-fold predictions")
        return uses
    uses = ["choosing the training epoch (early stopping)"]
    if cfg.calibrate != "none":
        uses.append(f"fitting the {cfg.calibrate}")
    if threshold is not None and not cfg.threshold.startswith("fixed"):
        uses.append(f"choosing the threshold ({cfg.threshold})")
    uses.append("the membership audit's non-members")
    return uses


def write_predictions(path: Path, task: Task, split: dict[str, np.ndarray], scored: Scores) -> None:
    """A predictions file: id (and the patient's pseudonym where patients are known, so that a
    paired comparison resamples whole patients), the task's columns (true label, calibrated and
    uncalibrated probabilities, the decision at the frozen threshold) and the out-of-distribution flag."""
    header, rows = task.prediction_columns(split["labels"], scored.probabilities, scored.uncalibrated,
                                           scored.predictions)
    patients = split.get("patients")
    first = ["id"] if patients is None else ["id", "patient"]
    keys = [[i] for i in split["ids"]] if patients is None else [[i, p] for i, p in zip(split["ids"], patients)]
    write_csv(path, [*first, *header, "out_of_distribution"],
              [[*key, *row, int(o)] for key, row, o in zip(keys, rows, scored.out_of_distribution)])


def write_curves(out_dir: Path, task: Task, labels: np.ndarray, probs: np.ndarray, positive: int,
                 baseline_probs: dict[str, np.ndarray]) -> None:
    """``roc.csv`` and ``pr.csv`` (DVC plot data) of the task's curves, and their figures: the
    CNN's curves, with each baseline's where the CNN has one (a binary task)."""
    roc_rows, pr_rows, roc_plot, pr_plot = [], [], {}, {}
    found = list(curves(task, labels, probs, positive))
    for name, (fpr, tpr, thr), (recall, precision) in found:
        roc_rows += [[name, f"{a:.6f}", f"{b:.6f}", f"{t:.6f}"] for a, b, t in zip(fpr, tpr, thr)]
        pr_rows += [[name, f"{r:.6f}", f"{p:.6f}"] for r, p in zip(recall, precision)]
        roc_plot[f"CNN {name}"] = (fpr, tpr, float(np.trapezoid(tpr, fpr)))
        pr_plot[f"CNN {name}"] = (recall, precision)
    for model_name, p in baseline_probs.items() if len(found) == 1 else ():
        for _, (fpr, tpr, _), (recall, precision) in curves(task, labels, p, positive):
            roc_plot[model_name] = (fpr, tpr, float(np.trapezoid(tpr, fpr)))
            pr_plot[model_name] = (recall, precision)
    write_csv(out_dir / paths.ROC_CSV, ["class", "fpr", "tpr", "threshold"], roc_rows)
    write_csv(out_dir / paths.PR_CSV, ["class", "recall", "precision"], pr_rows)
    plot_roc(roc_plot, out_dir / paths.ROC_PNG)
    plot_pr(pr_plot, out_dir / paths.PR_PNG)


def write_reliability(out_dir: Path, task: Task, labels: np.ndarray, scored: Scores, positive: int
                      ) -> dict[str, list[dict[str, Any]]]:
    """The reliability diagrams' data before and after calibration, written to ``calibration.csv``."""
    reliability = {when: calibration.reliability(*task.calibration_pairs(labels, p, positive))
                   for when, p in (("before", scored.uncalibrated), ("after", scored.probabilities))}
    write_csv(out_dir / paths.CALIBRATION_CSV, ["calibration", "bin", "predicted", "observed", "count"],
              [[when, r["bin"], r["predicted"], r["observed"], r["count"]] for when, rs in reliability.items() for r in rs])
    return reliability


def write_outputs(out_dir: Path, task: Task, result: dict[str, Any], test: dict[str, np.ndarray], scored: Scores,
                  names: list[str], positive: int, baseline_probs: dict[str, np.ndarray], cfg: EvaluateParams,
                  timing: dict[str, float], shown: dict[str, list[dict[str, Any]]]) -> None:
    """Every file of evaluate's folder; ``shown``: more test images for the failure figure and
    for explain (the images a cross-validation's folds disagree on most)."""
    labels, probs, preds = test["labels"], scored.probabilities, scored.predictions
    write_predictions(out_dir / paths.PREDICTIONS, task, test, scored)
    write_curves(out_dir, task, labels, probs, positive, baseline_probs)
    reliability = write_reliability(out_dir, task, labels, scored, positive)
    failures = {**failure_cases(labels, probs, preds, test["ids"], names, positive, cfg.failure_cases), **shown}
    write_json(out_dir / paths.FAILURES, failures)
    write_json(out_dir / paths.METRICS, result)
    write_json(out_dir / paths.TIMING, {k: rounded(v, SECONDS_DECIMALS) for k, v in timing.items()})
    plot_confusion(result["test"]["confusion_matrix"], names, out_dir / paths.CONFUSION_PNG)
    plot_calibration(reliability, result["calibration"], out_dir / paths.CALIBRATION_PNG)
    plot_failures(test["images"], failures, out_dir / paths.FAILURES_PNG)
    plot_robustness(result["robustness"], out_dir / paths.ROBUSTNESS_PNG)


def main() -> None:
    stage_main(__doc__.splitlines()[0], run)


if __name__ == "__main__":
    main()
