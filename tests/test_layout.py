"""The package's shape holds: dvc.yaml deps cover every import, params load light, registries match params.

Imports are read with ``ast`` (nothing is imported to find them), so the dependency test sees
function-level imports too, the ones that drift most easily.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

PACKAGE = REPO / "pipeline"
STAGES = ("source", "prepare", "balance", "fold", "train", "evaluate", "explain", "report", "track")


def module_file(name: str) -> Path | None:
    path = REPO / Path(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def direct_imports(name: str) -> set[str]:
    """``pipeline.*`` modules that ``name`` imports anywhere in its source, with their parent packages."""
    tree = ast.parse(module_file(name).read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    modules = set()
    for dotted in found:
        parts = dotted.split(".")
        if parts[0] != "pipeline":
            continue
        modules |= {".".join(parts[:i]) for i in range(1, len(parts) + 1) if module_file(".".join(parts[:i]))}
    return modules


def closure(name: str) -> set[str]:
    seen: set[str] = set()
    todo = [name]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += direct_imports(module)
    return seen


def stage_deps() -> dict[str, list[str]]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: [d for d in stage["deps"] if isinstance(d, str)] for name, stage in stages.items()}


def covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(REPO).as_posix()
    return any(relative == dep or relative.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_deps_cover_every_module_a_stage_imports(stage):
    deps = stage_deps()[stage]
    missing = sorted(module_file(m).relative_to(REPO).as_posix() for m in closure(f"pipeline.{stage}")
                     if not covered(module_file(m), deps))
    assert not missing, f"dvc.yaml stage '{stage}' imports modules its deps do not list: {missing}"


def test_every_dvc_code_dep_exists_and_every_stage_is_checked():
    for stage, deps in stage_deps().items():
        for dep in deps:
            if dep.startswith("pipeline"):
                assert (REPO / dep).exists(), f"{stage}: dep {dep} does not exist"
    assert set(stage_deps()) == set(STAGES)
    assert covered(PACKAGE / "reporting" / "templates" / "report.html.j2", stage_deps()["report"])


def test_the_dependency_check_can_fail(tmp_path):
    """The closure follows imports inside functions; a file missing from deps is reported."""
    assert "pipeline.evaluation.metrics" in closure("pipeline.train")
    assert "pipeline.modeling.checkpoints" in closure("pipeline.report")  # imported inside a function
    assert not covered(PACKAGE / "xai" / "trust.py", ["pipeline/train.py", "pipeline/core"])


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout


def test_loading_params_imports_neither_torch_nor_sklearn():
    out = run_python("import sys; from pipeline.core.config import load_params; load_params('params.yaml'); "
                     "print(sorted(m for m in ('torch', 'sklearn', 'scipy', 'matplotlib', 'mlflow') if m in sys.modules))")
    assert out.strip() == "[]"


def test_the_train_stage_starts_without_scipy_sklearn_or_matplotlib():
    """Its peak memory is what training needs: scipy.stats (64 MB) and matplotlib (30 MB) load later
    or never."""
    out = run_python("import sys, pipeline.train; "
                     "print(sorted(m for m in ('scipy', 'sklearn', 'matplotlib') if m in sys.modules))")
    assert out.strip() == "[]"


def test_importing_the_package_has_no_side_effects():
    """No module picks a matplotlib backend, imports pyplot, seeds a global generator or writes a file on import."""
    modules = sorted(f"pipeline.{p.relative_to(PACKAGE).with_suffix('').as_posix().replace('/', '.')}"
                     for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")
    # dict.__getitem__ reads the backend setting without resolving it (get_backend() would import pyplot).
    code = ("import importlib, os, sys, matplotlib, torch, numpy; "
            "before = dict.__getitem__(matplotlib.rcParams, 'backend'); "
            "state = torch.random.get_rng_state().clone(); np_state = numpy.random.get_state()[1].copy(); "
            "files = set(os.listdir('.')); "
            f"[importlib.import_module(m) for m in {modules!r}]; "
            "print(dict.__getitem__(matplotlib.rcParams, 'backend') == before, 'matplotlib.pyplot' not in sys.modules, "
            "bool(torch.equal(state, torch.random.get_rng_state())), "
            "bool((np_state == numpy.random.get_state()[1]).all()), set(os.listdir('.')) == files)")
    assert run_python(code).split() == ["True"] * 5


def test_stage_modules_sit_on_top_and_building_blocks_never_import_stages():
    stages = {p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    assert set(STAGES) <= stages
    for path in PACKAGE.rglob("*.py"):
        if path.parent == PACKAGE:
            continue
        name = "pipeline." + path.relative_to(PACKAGE).with_suffix("").as_posix().replace("/", ".")
        name = name.removesuffix(".__init__")
        assert not {f"pipeline.{s}" for s in stages} & direct_imports(name), f"{name} imports a stage"


def test_mlflow_is_imported_in_one_module_only():
    importers = [p.relative_to(REPO).as_posix() for p in PACKAGE.rglob("*.py")
                 if any(isinstance(n, (ast.Import, ast.ImportFrom)) and
                        any((getattr(n, "module", None) or a.name).split(".")[0] == "mlflow" for a in n.names)
                        for n in ast.walk(ast.parse(p.read_text())))]
    assert importers == ["pipeline/reporting/mlflow_adapter.py"]


def registries():
    from pipeline.core import config
    from pipeline.data import catalog, resampling, sources
    from pipeline.evaluation import baselines, calibration, corruptions, metrics
    from pipeline.modeling import networks, recipe
    from pipeline.xai import attributions

    return [
        (config.DataSource, sources.SOURCES), (config.MedmnistName, catalog.MEDMNIST),
        (config.BalanceStrategy, resampling.STRATEGIES), (config.Model, networks.NETWORKS),
        (config.Optimizer, recipe.OPTIMIZERS), (config.Sampler, recipe.SAMPLERS), (config.Loss, {**recipe.LOSSES, "auto": config.effective_loss}),
        (config.Schedule, recipe.SCHEDULES), (config.Calibration, calibration.CALIBRATIONS),
        (config.Baseline, baselines.BASELINES), (config.ThresholdRule, metrics.THRESHOLD_RULES),
        (config.ExplainMethod, attributions.METHODS), (config.Corruption, corruptions.CORRUPTIONS),
    ]


def test_every_choice_in_params_has_exactly_one_implementation():
    for choice, registry in registries():
        assert set(typing.get_args(choice)) == set(registry), (choice, sorted(registry))
    from pipeline.core import config
    from pipeline.data import catalog
    from pipeline.reporting import content

    for name in typing.get_args(config.MedmnistName):
        assert set(catalog.MEDMNIST[name][2]) == set(typing.get_args(config.MedmnistSize)), name
    # The report describes every strategy, sampler and schedule in words.
    assert set(content.STRATEGY_TEXT) == set(typing.get_args(config.BalanceStrategy))
    assert set(content.SAMPLER_TEXT) == set(typing.get_args(config.Sampler))
    assert set(content.SCHEDULE_TEXT) == set(typing.get_args(config.Schedule))
