"""The report's account of the hyperparameter search that chose the run's params (``tune.result``).

TRIPOD+AI (item 12c) asks how many configurations were tried and on what data. A run made from a
study's output (``python -m pipeline.tune args FILE`` sets ``tune.result: FILE``) reads that file
and states what it records: the study, its objective, how many trials ran, completed and were
pruned, the space, the best validation value and each param's importance. Every sentence is
checked against the run's own records first: a param the run does not share with the study's best
trial, or prepared data other than the study's, is said, not glossed over.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.config import Params, as_dict, flatten, read_yaml
from pipeline.core.errors import PipelineError
from pipeline.core.files import fmt


def read_study(path: Path) -> dict[str, Any]:
    """A ``pipeline.tune`` output or preset: a mapping with the best ``params`` (dotted keys)."""
    found = read_yaml(path, "not found (tune.result names a pipeline.tune output or a preset)")
    if not isinstance(found, dict) or not isinstance(found.get("params"), dict):
        raise PipelineError(f"{path}: expected a 'params' mapping of dotted keys (a pipeline.tune output)")
    return found


def space_text(dimension: dict[str, Any]) -> str:
    if "choices" in dimension:
        return "one of " + ", ".join(map(str, dimension["choices"]))
    return f"{fmt(dimension['low'])} to {fmt(dimension['high'])}" + (", log scale" if dimension.get("log") else "")


def context(params: Params, records: dict[str, Any], root: Path) -> dict[str, Any] | None:
    """The search section, or None when the run names no study."""
    if not params.tune.result:
        return None
    path = Path(params.tune.result)
    study = read_study(path if path.is_absolute() else root / path)
    run = flatten(as_dict(params))
    chosen = study["params"]
    differ = [k for k, v in {**study.get("setting", {}), **chosen}.items() if run.get(k) != v]
    counts = ", ".join(f"{study[k]} {word}" for k, word in (("complete", "complete"), ("pruned", "pruned"),
                                                           ("fail", "failed")) if k in study)
    intro = (f"This run's {len(chosen)} searched params ({', '.join(chosen)}) come from {path.name}: Optuna study "
             f"{study.get('study', '(unnamed)')}, {study.get('trials', '?')} trials ({counts}), TPE sampling, scored "
             f"on the {study.get('objective', 'validation metric')}; the search never read the test split. Its best "
             f"trial{' (' + str(study['best_trial']) + ')' if 'best_trial' in study else ''} reached "
             f"{fmt(study.get('best_value'))}.")
    sentences = []
    if differ:
        sentences.append(f"This run differs from the study's best trial in {', '.join(differ)}: the search did not "
                         "choose these values, and its validation value does not describe this run.")
    ours, theirs = records["data"].get("arrays_sha256"), study.get("prepared_sha256")
    if theirs:
        sentences.append("The study ran on the same prepared data as this run." if ours == theirs else
                         f"The study ran on other prepared data (sha256 {theirs[:12]}…, this run's {str(ours)[:12]}…).")
    importance = study.get("importance") or {}
    rows = [[d["key"], space_text(d), fmt(run.get(d["key"])), fmt(importance.get(d["key"]))]
            for d in study.get("space", [])]
    return {"intro": intro, "rows": rows, "header": ["param", "searched over", "this run", "importance (fANOVA)"],
            "sentences": sentences}
