"""The words and tables of a cross-validation (``cv.folds``; evaluate's ``cross_validation``
record, see :func:`pipeline.evaluate.cross_validation`, and the train stage's ``per_fold``).

The cross-validated estimate and the locked test split's are stated side by side; the
ensemble is called better or worse than its folds' pooled estimate only where the two
intervals do not overlap (:func:`pipeline.reporting.external.apart`), and every sentence is
built from the run's own numbers."""

from __future__ import annotations

from typing import Any

from pipeline.core.files import fmt
from pipeline.reporting.external import apart, with_ci

METRICS = ("roc_auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy")
NAMES = {"roc_auc": "ROC AUC", "balanced_accuracy": "balanced accuracy"}


def name(key: str) -> str:
    return NAMES.get(key, key)


def context(records: dict[str, Any]) -> dict[str, Any]:
    """The report's cross-validation section; empty for the single split."""
    cv = records["eval"].get("cross_validation")
    if not cv:
        return {}
    trained, test = records["train"]["per_fold"], records["eval"]["test"]
    keys = [k for k in METRICS if k in cv["mean"]]
    rows = [[f"fold {n}", row["n"], trained[n]["epochs_run"], trained[n]["best_epoch"], fmt(row["threshold"]),
             *[fmt(row.get(k)) for k in keys]] for n, row in cv["per_fold"].items()]
    rows.append(["mean ± sd", cv["images"], "", "", "",
                 *[f"{fmt(cv['mean'][k])} ± {fmt(cv['sd'][k])}" for k in keys]])
    pooled = cv["pooled"]
    rows.append(["pooled out-of-fold (95% CI)", pooled["n"], "", "", fmt(test["threshold"]),
                 *[with_ci(pooled, k) if k in pooled else "n/a" for k in keys]])
    rows.append(["ensemble on the test split (95% CI)", test["n"], "", "", fmt(test["threshold"]),
                 *[with_ci(test, k) if k in test else "n/a" for k in keys]])
    side = apart(test, pooled)
    verdict = ("the two intervals overlap: the test split does not tell them apart" if side == 0 else
               "the ensemble's interval on the test split lies wholly above the pooled out-of-fold one" if side > 0
               else "the ensemble's interval on the test split lies wholly below the pooled out-of-fold one")
    spread = cv["disagreement"]
    return {
        "intro": (f"{cv['folds']}-fold cross-validation over the {cv['images']} development images (train + val), "
                  "folds of whole patients, stratified by class and seeded. Each fold model was trained on the other "
                  "folds and validated on its own (early stopping, temperature and the per-fold threshold below); "
                  "the fold models, each behind its own temperature, were averaged into the one model that was "
                  "scored on the locked test split and that the package, predict and serving use."),
        "header": ["", "images", "epochs run", "epoch kept", "threshold", *[name(k) for k in keys]],
        "rows": rows,
        "sentences": [
            (f"Cross-validated ROC AUC {with_ci(pooled, 'roc_auc')} (pooled out-of-fold; per fold "
             f"{fmt(cv['mean']['roc_auc'])} ± {fmt(cv['sd']['roc_auc'])}) against {with_ci(test, 'roc_auc')} for the "
             f"ensemble on the test split: {verdict}."),
            ("The out-of-fold estimate is optimistic: each fold's epoch and threshold were chosen on the very images "
             "it is measured on (the pooled row at the ensemble's threshold, which the pooled predictions chose). "
             "Only the test split was never used for a choice."),
            (f"Ensemble disagreement on the {spread['images']} test images ({spread['measure']} across the "
             f"{cv['folds']} fold models): mean {fmt(spread['mean_sd'])}, largest {fmt(spread['max_sd'])}; the fold "
             "models' decisions (each at its own threshold) differ on "
             f"{fmt(round(100 * spread['decisions_differ'], 2))}% of them. The images they disagree on most are in "
             "the failure cases (section 6) and are explained in section 7."),
        ],
    }


def epochs_text(train: dict[str, Any]) -> str:
    """The model table's "epochs run / selected": one pair, or one per fold."""
    if "per_fold" not in train:
        return f"{train['epochs_run']} / {train['best_epoch']}"
    return ", ".join(f"fold {n}: {t['epochs_run']} / {t['best_epoch']}" for n, t in train["per_fold"].items())
