"""Typed, validated view of ``params.yaml``.

One frozen dataclass per section, field names identical to the YAML keys. Building them is
strict: an unknown key, a missing key, a value of the wrong type or an unknown choice fails
with a :class:`PipelineError` naming the file and the dotted key, so a typo in
``dvc exp run -S train.lrr=0.1`` can never be silently ignored.

Every stage loads params first, so this module imports only PyYAML: never torch or
scikit-learn (a test checks it), which would cost each stage seconds before it does any work.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pipeline.core.errors import PipelineError

# Every choice in params.yaml is a Literal here and, where it selects an implementation, the
# keys of one registry dict next to that implementation (a test checks that the two agree).
DataSource = Literal["phantom", "npz", "medmnist", "folder", "csv"]  # data.sources.SOURCES
MedmnistName = Literal["pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist", "retinamnist",
                       "breastmnist", "bloodmnist", "tissuemnist", "organamnist"]  # data.catalog.MEDMNIST
TaskName = Literal["binary", "multiclass", "multilabel", "ordinal"]  # tasks.TASKS
Task = Literal["auto", "binary", "multiclass", "multilabel", "ordinal"]
MedmnistSize = Literal[28, 64, 128, 224]
DuplicatePolicy = Literal["error", "warn", "drop"]
OnError = Literal["error", "skip"]
DicomFrames = Literal["error", "first"]
Channels = Literal[1, 3]
Dimensions = Literal[2, 3]  # images or volumes
BalanceStrategy = Literal["none", "class_weight", "oversample", "undersample", "smote"]  # data.resampling.STRATEGIES
Model = Literal["seed_cnn", "small_cnn", "resnet18", "monai_resnet18", "resnet50", "densenet121", "efficientnet_b0",
                "seresnext50"]  # modeling.networks.NETWORKS
Optimizer = Literal["sgd", "adamw"]  # modeling.recipe.OPTIMIZERS
Sampler = Literal["none", "weighted"]  # modeling.recipe.SAMPLERS
Loss = Literal["auto", "cross_entropy", "focal", "corn"]  # modeling.recipe.LOSSES, and auto: effective_loss
Schedule = Literal["none", "cosine", "onecycle"]  # modeling.recipe.SCHEDULES
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["bf16", "float32"]  # autocast on CUDA; the CPU trains in float32
Norm = Literal["batch", "group"]  # modeling.networks.NORMS
Accountant = Literal["prv", "rdp", "gdp"]  # Opacus' accountants
Calibration = Literal["temperature", "none"]  # evaluation.calibration.CALIBRATIONS
Baseline = Literal["logistic_regression", "random_forest", "svm", "decision_tree"]  # evaluation.baselines.BASELINES
ThresholdRule = Literal["youden", "sensitivity", "fixed"]  # evaluation.metrics.THRESHOLD_RULES
Corruption = Literal["gaussian_noise", "blur", "contrast", "brightness", "gamma", "jpeg",
                     "pixelate"]  # evaluation.corruptions.CORRUPTIONS
ExplainMethod = Literal["saliency", "integrated_gradients", "smoothgrad", "grad_cam", "guided_grad_cam", "occlusion",
                        "lime"]  # xai.attributions.METHODS


def effective_loss(loss: str, task: str | None) -> str:
    """``train.loss: auto`` is the loss that measured best for the task: CORN for ordinal grades
    (higher validation kappa than cross-entropy on the ordinal phantom), cross-entropy otherwise
    (binary cross-entropy per finding for multi-label data)."""
    return ({"ordinal": "corn"}.get(task or "", "cross_entropy")) if loss == "auto" else loss


# train.warmup_epochs and train.grad_clip: auto — the recipe per norm that measured best on
# validation (bench/norms.py, BreastMNIST seeds 0-2; docs/performance.md). Batch norm keeps the one
# the project was tuned with; group norm (what DP-SGD and exact DDP need) barely learned with it
# (validation ROC AUC 0.747) and learns with two warm-up epochs and gradients clipped at 1 (0.914).
# Under DP-SGD the clipping is Opacus' own, per image (train.privacy.max_grad_norm).
AUTO_WARMUP = {"batch": 0, "group": 2}
AUTO_CLIP = {"batch": 0.0, "group": 1.0}


def effective_train(cfg: TrainParams, task: str | None) -> TrainParams:
    """``train`` as it runs for a ``task``: every ``auto`` resolved: ``loss`` (:func:`effective_loss`),
    ``warmup_epochs`` (``AUTO_WARMUP`` by norm, at most ``epochs - 1``) and ``grad_clip``
    (``AUTO_CLIP`` by norm; 0 under DP-SGD)."""
    return dataclasses.replace(
        cfg, loss=effective_loss(cfg.loss, task),
        warmup_epochs=min(AUTO_WARMUP[cfg.norm], cfg.epochs - 1) if cfg.warmup_epochs == "auto" else cfg.warmup_epochs,
        grad_clip=(0.0 if cfg.privacy.enabled else AUTO_CLIP[cfg.norm]) if cfg.grad_clip == "auto" else cfg.grad_clip)


def parse_threshold(rule: str) -> tuple[str, float | None]:
    """``youden`` | ``sensitivity@S`` | ``fixed:T`` -> (rule name, its value); PipelineError when malformed."""
    match = re.fullmatch(r"(youden)|(sensitivity)@([0-9.]+)|(fixed):([0-9.]+)", rule)
    if not match:
        raise PipelineError(f"'evaluate.threshold' is {rule!r}: must be youden, sensitivity@<0..1> or fixed:<0..1>")
    if match.group(1):
        return "youden", None
    name, value = (match.group(2), match.group(3)) if match.group(2) else (match.group(4), match.group(5))
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 < number < 1:
        raise PipelineError(f"'evaluate.threshold' is {rule!r}: needs a value strictly between 0 and 1")
    return name, number


@dataclasses.dataclass(frozen=True)
class PhantomParams:
    """Settings of the built-in simulated scans (see :mod:`pipeline.data.phantom`)."""

    ndim: Dimensions
    task: TaskName
    image_size: Union[int, None]
    n_train: int
    n_val: int
    n_test: int
    prevalence: float
    lesion_contrast: float
    lesion_radius: tuple[float, float]
    lookalikes: float
    noise: float
    site_noise: tuple[float, ...]
    shortcut: Union[float, None]

    def __post_init__(self) -> None:
        _check(self.image_size is None or self.image_size >= 16, "data.phantom.image_size", "must be null or at least 16")
        _check(self.task != "multiclass", "data.phantom.task", "must be binary, multilabel or ordinal")
        _check(self.task == "binary" or self.ndim == 2, "data.phantom.task",
               f"{self.task} phantoms are images: needs data.phantom.ndim 2")
        for key in ("n_train", "n_val", "n_test"):
            _check(getattr(self, key) >= 4, f"data.phantom.{key}", "must be at least 4")
        _check(0.0 < self.prevalence < 1.0, "data.phantom.prevalence", "must lie in (0, 1)")
        _check(self.lesion_contrast > 0, "data.phantom.lesion_contrast", "must be positive")
        low, high = self.lesion_radius
        _check(0 < low <= high, "data.phantom.lesion_radius", "must be [min, max] with 0 < min <= max")
        _check(self.lookalikes >= 0, "data.phantom.lookalikes", "must be >= 0")
        _check(self.noise >= 0, "data.phantom.noise", "must be >= 0")
        _check(len(self.site_noise) >= 1 and min(self.site_noise) > 0, "data.phantom.site_noise",
               "must list one positive noise factor per simulated scanner site")
        _check(self.shortcut is None or 0 <= self.shortcut <= 1, "data.phantom.shortcut", "must be null or in [0, 1]")


@dataclasses.dataclass(frozen=True)
class SplitParams:
    val: float
    test: float

    def __post_init__(self) -> None:
        _check(0 < self.val < 1 and 0 < self.test < 1 and self.val + self.test < 1, "data.split",
               "needs 0 < val, 0 < test and val + test < 1")


@dataclasses.dataclass(frozen=True)
class DicomParams:
    window_center: Union[float, None]
    window_width: Union[float, None]
    frames: DicomFrames
    series: bool

    def __post_init__(self) -> None:
        _check(self.window_width is None or self.window_width > 0, "data.dicom.window_width", "must be positive")


@dataclasses.dataclass(frozen=True)
class DataParams:
    source: DataSource
    task: Task
    path: Union[str, None]
    name: Union[MedmnistName, None]
    size: MedmnistSize
    raw_dir: str
    class_names: tuple[str, ...]
    image_size: Union[int, None]
    spacing: Union[float, None]
    channels: Union[Channels, None]
    split: SplitParams
    group_column: Union[str, None]
    duplicates: DuplicatePolicy
    on_error: OnError
    pseudonym_salt: str
    dicom: DicomParams
    phantom: PhantomParams

    def __post_init__(self) -> None:
        if self.source in ("npz", "folder", "csv"):
            _check(bool(self.path), "data.path", f"must name the input for data.source={self.source}")
        if self.source == "medmnist":
            _check(self.name is not None, "data.name",
                   f"must name the dataset for data.source=medmnist, one of: {', '.join(typing.get_args(MedmnistName))}")
        _check(self.image_size is None or self.image_size >= 8, "data.image_size", "must be null or >= 8")
        _check(self.spacing is None or self.spacing > 0, "data.spacing", "must be null or a positive spacing in mm")


@dataclasses.dataclass(frozen=True)
class BalanceParams:
    strategy: BalanceStrategy
    smote_k_neighbors: int

    def __post_init__(self) -> None:
        _check(self.smote_k_neighbors >= 1, "balance.smote_k_neighbors", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class PretrainedParams:
    """Start from pretrained weights (see :mod:`pipeline.modeling.pretrained`)."""

    weights: Union[str, None]
    sha256: Union[str, None]
    source: Union[str, None]

    def __post_init__(self) -> None:
        _check(self.sha256 is None or (len(self.sha256) == 64 and all(c in "0123456789abcdef" for c in self.sha256)),
               "train.pretrained.sha256", "must be 64 lower-case hex digits")
        _check(not (self.is_url and not self.sha256), "train.pretrained.sha256",
               "is required for a URL (the download is checked against it)")

    @property
    def is_url(self) -> bool:
        """``weights`` names a URL to fetch (``https://…``, ``file://…``), not a local path."""
        return bool(self.weights) and "://" in self.weights


@dataclasses.dataclass(frozen=True)
class PrivacyParams:
    """DP-SGD with Opacus (see :mod:`pipeline.modeling.dp_sgd`)."""

    enabled: bool
    target_epsilon: float
    delta: Union[float, None]
    max_grad_norm: float
    accountant: Accountant
    secure_mode: bool

    def __post_init__(self) -> None:
        _check(self.target_epsilon > 0, "train.privacy.target_epsilon", "must be positive")
        _check(self.delta is None or 0 < self.delta < 1, "train.privacy.delta", "must be null (1/(10·n)) or in (0, 1)")
        _check(self.max_grad_norm > 0, "train.privacy.max_grad_norm", "must be positive")


@dataclasses.dataclass(frozen=True)
class TrainParams:
    model: Model
    width: int
    optimizer: Optimizer
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    epochs: int
    patience: int
    sampler: Sampler
    loss: Loss
    focal_gamma: float
    label_smoothing: float
    grad_clip: Union[float, Literal["auto"]]
    ema: float
    schedule: Schedule
    warmup_epochs: Union[int, Literal["auto"]]
    aug_rotate: float
    aug_translate: float
    aug_scale: float
    aug_flip: bool
    aug_intensity: float
    threads: int
    device: Device
    precision: Precision
    channels_last: bool
    norm: Norm
    workers: int
    processes: int
    pretrained: PretrainedParams
    privacy: PrivacyParams

    def __post_init__(self) -> None:
        _check(self.focal_gamma >= 0, "train.focal_gamma", "must be >= 0")
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing", "must lie in [0, 1)")
        _check(self.grad_clip == "auto" or self.grad_clip >= 0, "train.grad_clip", "must be auto or >= 0 (0 = off)")
        _check(0 <= self.ema < 1, "train.ema", "must lie in [0, 1) (0 = off)")
        _check(self.warmup_epochs == "auto" or 0 <= self.warmup_epochs < self.epochs, "train.warmup_epochs",
               "must be auto or lie in [0, train.epochs)")
        for key in ("aug_rotate", "aug_translate", "aug_scale", "aug_intensity"):
            _check(getattr(self, key) >= 0, f"train.{key}", "must be >= 0 (0 = off)")
        _check(self.width >= 1, "train.width", "must be >= 1")
        _check(self.lr > 0, "train.lr", "must be positive")
        _check(0 <= self.momentum < 1, "train.momentum", "must lie in [0, 1)")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.patience >= 1, "train.patience", "must be >= 1")
        _check(self.threads >= 1, "train.threads", "must be >= 1")
        _check(self.workers >= 0, "train.workers", "must be >= 0 (0 reads batches in the training process)")
        _check(self.processes >= 1, "train.processes", "must be >= 1")
        _check(self.batch_size >= self.processes, "train.batch_size",
               f"must be at least train.processes ({self.processes}): each process takes a share of every batch")


ExternalSplit = Literal["all", "train", "val", "test"]
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,39}")


@dataclasses.dataclass(frozen=True)
class ExternalParams:
    """One external validation set (``evaluate.external``): data from elsewhere, prepared with the
    development data's preprocessing and scored by the frozen model, never trained or tuned on.
    Keys left out take these defaults."""

    name: str  # how the report and MLflow name the site
    source: DataSource  # phantom: the built-in shifted scanner site
    path: Union[str, None] = None  # npz file, image folder or CSV manifest
    dataset: Union[MedmnistName, None] = None  # source=medmnist (its data.size)
    split: ExternalSplit = "all"  # which of the source's own splits to use (npz, medmnist, manifests with a split column)
    recalibrate: float = 0.0  # fraction of the site's images to refit temperature and threshold on (0 = off)

    def __post_init__(self) -> None:
        _check(bool(SITE_NAME.fullmatch(self.name)), "evaluate.external[].name",
               f"{self.name!r} must be 1-40 letters, digits, '_' or '-'")
        if self.source in ("npz", "folder", "csv"):
            _check(bool(self.path), f"evaluate.external.{self.name}.path", f"must name the input for source={self.source}")
        if self.source == "medmnist":
            _check(self.dataset is not None, f"evaluate.external.{self.name}.dataset", "must name the MedMNIST dataset")
        _check(0.0 <= self.recalibrate < 1.0, f"evaluate.external.{self.name}.recalibrate", "must lie in [0, 1)")

    def applied_to(self, data: DataParams) -> DataParams:
        """The development's data params with this site's input: every preprocessing setting kept."""
        return dataclasses.replace(data, source=self.source, path=self.path, name=self.dataset or data.name)


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    positive_class: int
    threshold: str
    calibrate: Calibration
    bootstrap: int
    baselines: tuple[Baseline, ...]
    svm_max_train: int
    baseline_max_train: int
    failure_cases: int
    batch_size: int
    corruptions: tuple[Corruption, ...]
    severities: tuple[int, ...]
    robustness_images: int
    external: tuple[ExternalParams, ...]

    def __post_init__(self) -> None:
        _check(self.positive_class >= 0, "evaluate.positive_class", "must be >= 0")
        names = [site.name for site in self.external]
        _check(len(set(names)) == len(names), "evaluate.external", f"site names must differ: {names}")
        _check(all(s in (1, 2, 3) for s in self.severities), "evaluate.severities", "must list severities 1, 2 or 3")
        _check(self.robustness_images >= 10, "evaluate.robustness_images", "must be >= 10")
        parse_threshold(self.threshold)
        _check(self.bootstrap >= 100, "evaluate.bootstrap", "must be >= 100 resamples (1000+ recommended)")
        _check(self.svm_max_train >= 0, "evaluate.svm_max_train", "must be >= 0")
        _check(self.baseline_max_train >= 10, "evaluate.baseline_max_train", "must be >= 10")
        _check(self.failure_cases >= 0, "evaluate.failure_cases", "must be >= 0")
        _check(self.batch_size >= 1, "evaluate.batch_size", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class ExplainParams:
    methods: tuple[ExplainMethod, ...]
    per_outcome: int
    worst: int
    localisation_images: int
    ig_steps: int
    smoothgrad_samples: int
    smoothgrad_stdev: float
    occlusion_window: float
    lime_samples: int
    lime_grid: int
    faithfulness_steps: int
    perturbations: int
    sanity_threshold: float
    shortcut_threshold: float
    class_image_steps: int
    batch_size: int

    def __post_init__(self) -> None:
        _check(len(self.methods) > 0, "explain.methods", "must name at least one method")
        _check(self.per_outcome >= 1, "explain.per_outcome", "must be >= 1")
        _check(self.localisation_images >= 1, "explain.localisation_images", "must be >= 1")
        for key in ("ig_steps", "smoothgrad_samples", "lime_samples", "lime_grid", "faithfulness_steps", "perturbations",
                    "batch_size"):
            _check(getattr(self, key) >= 2, f"explain.{key}", "must be >= 2")
        _check(self.worst >= 0, "explain.worst", "must be >= 0")
        _check(self.class_image_steps >= 0, "explain.class_image_steps", "must be >= 0 (0 turns it off)")
        _check(0 < self.occlusion_window < 1, "explain.occlusion_window", "is a fraction of the image side, in (0, 1)")
        _check(0 < self.sanity_threshold < 1, "explain.sanity_threshold", "must lie in (0, 1)")
        _check(0 < self.shortcut_threshold < 1, "explain.shortcut_threshold", "must lie in (0, 1)")


@dataclasses.dataclass(frozen=True)
class CvParams:
    """Cross-validation over the development data (train + val), split by patient.

    ``folds`` lists the folds by number, ``[1, 2, ..., k]`` for k-fold: DVC's ``matrix`` makes one
    ``fold@<number>`` stage of each entry, and a number is what it expands, never a count. The
    empty list is the single train/validation split."""

    folds: tuple[int, ...]

    def __post_init__(self) -> None:
        _check(not self.folds or list(self.folds) == list(range(1, len(self.folds) + 1)), "cv.folds",
               f"must be [] (one split) or the fold numbers 1..k in order, e.g. [1, 2, 3, 4, 5]; "
               f"got {list(self.folds)}")
        _check(len(self.folds) != 1, "cv.folds", "[1] is one fold: use [] for the single split or at least [1, 2]")

    @property
    def k(self) -> int:
        """The number of folds; 0 for the single split."""
        return len(self.folds)


TUNABLE = ("train.", "balance.")  # the sections a search may change (never data, cv or evaluate: the design)


@dataclasses.dataclass(frozen=True)
class SearchDimension:
    """One entry of ``tune.space``: a ``train.*`` or ``balance.*`` key and its range (``low`` ..
    ``high``, on a log scale with ``log``; whole numbers where the param is an integer) or its
    ``choices``. Keys left out take these defaults."""

    key: str
    low: Union[float, None] = None
    high: Union[float, None] = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        where = f"tune.space.{self.key}"
        _check(self.key.startswith(TUNABLE), where, f"must be a {' or '.join(t + '*' for t in TUNABLE)} key")
        hint = param_type(self.key)
        _check(hint is not None, where, "names no param")
        if self.choices:
            _check(self.low is None and self.high is None, where, "takes choices or low/high, not both")
        else:
            _check(hint in (int, float), where, "is not a number: give it choices")
            _check(self.low is not None and self.high is not None and self.low < self.high, where,
                   "needs low < high (or choices)")
            _check(not self.log or self.low > 0, where, "needs low > 0 on a log scale")

    @property
    def integer(self) -> bool:
        return param_type(self.key) is int


@dataclasses.dataclass(frozen=True)
class TuneParams:
    """``python -m pipeline.tune``: an Optuna study over ``space`` on the validation metric (the
    cross-validated one with ``cv.folds``), never on the test split."""

    trials: int
    seed: int  # the sampler's: the same seed and trials on one worker give the same trials
    pruning: bool  # stop a trial whose per-epoch validation metric falls below the median of earlier trials
    space: tuple[SearchDimension, ...]
    result: Union[str, None]  # the study file whose best params this run applies; the report states its search

    def __post_init__(self) -> None:
        _check(self.trials >= 1, "tune.trials", "must be >= 1")
        keys = [d.key for d in self.space]
        _check(len(set(keys)) == len(keys), "tune.space", f"lists a key twice: {keys}")


def param_type(dotted: str) -> Any:
    """The type a dotted params key holds (``int``, ``float``, a ``Literal``, ...), None if no such
    key; for a number that may also be ``auto``, the number's type."""
    cls: Any = Params
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        cls = hints[part]
    numbers = [a for a in typing.get_args(cls) if a in (int, float)]
    return numbers[0] if numbers else cls


@dataclasses.dataclass(frozen=True)
class ReportParams:
    title: str
    intended_use: str


@dataclasses.dataclass(frozen=True)
class TrackParams:
    experiment: str
    registered_model: str

    def __post_init__(self) -> None:
        _check(bool(re.fullmatch(r"[\w.-]+", self.registered_model)), "track.registered_model",
               "must be a name of letters, digits, '_', '-' and '.'")


@dataclasses.dataclass(frozen=True)
class Params:
    seed: int
    data: DataParams
    balance: BalanceParams
    train: TrainParams
    cv: CvParams
    evaluate: EvaluateParams
    explain: ExplainParams
    report: ReportParams
    track: TrackParams
    tune: TuneParams


def read_yaml(path: Path, missing: str) -> Any:
    """A YAML file's content; a missing file or bad YAML is one :class:`PipelineError` naming it."""
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: {missing}") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML ({exc})") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; every problem is a :class:`PipelineError`."""
    path = Path(path)
    raw = read_yaml(path, "params file not found")
    try:
        return build(Params, raw, "")
    except PipelineError as exc:
        raise PipelineError(f"{path}: {exc}") from None


def override(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a raw params mapping, as ``dvc exp run -S train.lr=0.01`` does (in place)."""
    for dotted, value in overrides.items():
        *parents, key = dotted.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[key] = value
    return raw


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["train.lr=0.01", "evaluate.baselines=[]"]`` -> dotted keys with YAML-typed values, as ``-S`` takes them."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise PipelineError(f"override {pair!r}: expected key=value")
        parsed[key] = yaml.safe_load(value)
    return parsed


def write_params(dest: Path, overrides: dict[str, Any], base: Path = Path("params.yaml")) -> Path:
    """``base`` with dotted-key overrides applied, written to ``dest`` (for benchmarks and tests)."""
    raw = override(yaml.safe_load(Path(base).read_text()), overrides)
    Path(dest).write_text(yaml.safe_dump(raw, sort_keys=False))
    return Path(dest)


def as_dict(params: Any) -> dict[str, Any]:
    """Params back to plain YAML-like data (tuples become lists)."""
    return _plain(dataclasses.asdict(params))


def leaves(mapping: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every non-mapping value of a nested mapping with the keys that lead to it."""
    for key, value in mapping.items():
        if isinstance(value, dict):
            yield from leaves(value, (*path, str(key)))
        else:
            yield (*path, str(key)), value


def flatten(mapping: dict[str, Any]) -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``, the names MLflow and DVC show."""
    return {".".join(keys): value for keys, value in leaves(mapping)}


def build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown and missing keys."""
    if not isinstance(raw, dict):
        raise PipelineError(f"'{where or 'top level'}' must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise PipelineError(f"unknown key '{_join(where, unknown[0])}' (expected one of: {', '.join(fields)})")
    missing = [name for name, f in fields.items() if name not in raw and f.default is dataclasses.MISSING]
    if missing:
        raise PipelineError(f"missing key '{_join(where, missing[0])}'")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(hints[name], raw[name], _join(where, name)) for name in fields if name in raw}
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if hint is Any:  # a value for another key (tune.space's choices), checked when it is used
        return value
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            raise PipelineError(f"'{where}' is {value!r}; choose one of: {', '.join(str(a) for a in args)}")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for option in inner[:-1]:  # the first type the value fits (a number, else a choice like auto)
            try:
                return _coerce(option, value, where)
            except PipelineError:
                pass
        return _coerce(inner[-1], value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise PipelineError(f"'{where}' must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise PipelineError(f"'{where}' must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise PipelineError(f"'{where}' must be {getattr(hint, '__name__', hint)}, got {value!r}")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise PipelineError(f"'{key}' {problem}")

