"""Typed experiment configuration: dataclasses validated at construction, YAML in and out.

Every section is a small dataclass whose fields carry their types; `load_config` builds them from a
YAML file plus dotted overrides (``model.dcg.k=4``), and a bad value fails at start-up with a
`ConfigError` that names the full key. `dump_config` writes YAML that loads back to an equal config.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .diffusion.probability import AGGREGATES, PROBABILITY_RULES, conflict, rule_in_force
from .diffusion.sampler import SAMPLERS
from .diffusion.uncertainty import MEASURES, UNCERTAINTY_MEASURES
from .errors import UserError

# The ResNet trunks downsample by 32: one saliency-map cell covers a 32x32 tile of the input.
CELL_SIZE = 32
Backbone = Literal["resnet18", "resnet34", "resnet50"]


class ConfigError(UserError, ValueError):
    """A configuration value is wrong; the message names the dotted key and what is allowed."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.detail = message
        # A problem of the whole file (key "") names the file itself, not an empty key.
        super().__init__(f"config key '{key}': {message}" if key else message)

    def under(self, prefix: str) -> "ConfigError":
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.detail)


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp`; ints widen to floats, nothing else is guessed."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value is False and "no" in typing.get_args(tp):
            value = "no"  # YAML 1.1 reads an unquoted `no` (also in --set key=no) as false
        _require(value in typing.get_args(tp) and not isinstance(value, bool), key,
                 f"got {value!r}, expected {_type_name(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(error.detail)
        raise ConfigError(key, "; ".join(errors))
    if origin in (list, tuple):
        _require(isinstance(value, (list, tuple)), key, f"got {value!r}, expected a list")
        (item_type, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        _require(isinstance(value, dict), key, f"got {value!r}, expected a mapping")
        return _from_dict(tp, value, key)
    if tp is Any:
        return value
    if tp is bool:
        _require(isinstance(value, bool), key, f"got {value!r}, expected true or false")
        return value
    if tp is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key,
                 f"got {value!r}, expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key,
                 f"got {value!r}, expected a number")
        # No setting means anything at infinity, and a NaN compares false with every bound a section checks.
        _require(math.isfinite(value), key, f"got {value!r}, expected a finite number")
        return float(value)
    if tp is str:
        _require(isinstance(value, str), key, f"got {value!r}, expected a string")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _from_dict(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(key, f"unknown key; valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError as error:
        raise error.under(prefix) if prefix else error


# Accelerate's experiment trackers and the package each needs (`pip install diffmic[NAME]` for ours).
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny", "comet_ml": "comet_ml",
            "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}


def flag(default: Any, name: str, help: str) -> Any:
    """A dataclass field that is also a command-line flag: diffmic.cli declares the Typer option from this
    metadata (the eval/predict settings from EvalConfig, the launch flags from SlurmOptions), so a new flag is one
    field (plus its use)."""
    return field(default=default, metadata={"flag": name, "help": help})


class Section:
    """Base of every config section: type-checks its own fields, then runs `validate`."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name], f.name))
        self.validate()

    def validate(self) -> None:
        """Range checks of one section; cross-section checks live in `Config.validate`."""


@dataclass
class AugmentConfig(Section):
    hflip: bool = True
    vflip: bool = False
    rotation: float = 30.0  # degrees, uniform in [-rotation, rotation]

    def validate(self) -> None:
        _require(0 <= self.rotation <= 180, "rotation", f"got {self.rotation}, expected 0..180 degrees")


@dataclass
class DataConfig(Section):
    dataset: str = "ham10000"
    shards: str = ""  # folder made by `diffmic shard`; empty means shards/<dataset>
    num_classes: int = 7
    image_size: int = 224
    num_workers: int = 4
    shuffle_buffer: int = 1000  # training samples each loader worker holds to shuffle across shards
    # Cross-validation (`diffmic shard --folds K`): validate on fold i, train on the other folds; -1: none.
    fold: int = -1
    # Class-balanced training stream: each sample repeated in proportion to 1 / its class's count in the
    # manifest, so every class is drawn at the same rate; an epoch keeps its number of batches.
    balanced_sampling: bool = False
    # Shards at a URL (s3://...): a local folder where each shard is kept once fetched and checked, so that later
    # epochs and restarts read it from disk; '' reads them from the storage every time. Machine-local: a resume
    # may change it (and fetch_retries) freely.
    cache_dir: str = ""
    # A fetch that loses its connection is tried again this many times, waiting 1, 2, 4, ... s (at most 30 s).
    fetch_retries: int = 6
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # ImageNet statistics: the trunks expect them, pretrained or not.
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])

    def validate(self) -> None:
        _require(self.num_classes >= 2, "num_classes", f"got {self.num_classes}, expected at least 2")
        _require(self.image_size >= CELL_SIZE and self.image_size % CELL_SIZE == 0, "image_size",
                 f"got {self.image_size}, expected a positive multiple of {CELL_SIZE}")
        _require(self.num_workers >= 0, "num_workers", f"got {self.num_workers}, expected >= 0")
        _require(self.shuffle_buffer >= 1, "shuffle_buffer", f"got {self.shuffle_buffer}, expected at least 1")
        _require(self.fetch_retries >= 0, "fetch_retries", f"got {self.fetch_retries}, expected >= 0")
        _require(self.fold >= -1, "fold", f"got {self.fold}, expected a fold number 0..K-1, or -1 for none")
        for key in ("mean", "std"):
            _require(len(getattr(self, key)) == 3, key, "expected three values (R, G, B)")
        _require(all(s > 0 for s in self.std), "std", "every value must be positive")


@dataclass
class DCGConfig(Section):
    backbone: Backbone = "resnet50"
    local_backbone: Backbone = "resnet50"
    # Both trunks' starting weights: 'imagenet' (torchvision's IMAGENET1K_V1, through its weights API and the
    # torch hub cache), a torchvision ResNet state dict file, or '' for random init.
    pretrained: str = ""
    k: int = 6  # number of ROI tiles
    top_t: float = 1.0  # fraction of saliency cells pooled into y_g (1.0 = global average pooling)
    crop_channels: Literal["all", "first"] = "all"  # 'first' = the reference's channel-0 crops
    attention_dim: int = 128

    def validate(self) -> None:
        _require(self.k >= 1, "k", f"got {self.k}, expected at least 1")
        _require(0.0 < self.top_t <= 1.0, "top_t", f"got {self.top_t}, expected a fraction in (0, 1]")
        _require(self.attention_dim >= 1, "attention_dim", "expected a positive width")


@dataclass
class DenoiserConfig(Section):
    encoder: Backbone = "resnet18"
    pretrained: str = ""  # as model.dcg.pretrained; the authors' code starts the encoder at random
    feature_dim: int = 6144

    def validate(self) -> None:
        _require(self.feature_dim >= 1, "feature_dim", f"got {self.feature_dim}, expected a positive width")


@dataclass
class ClassifierConfig(Section):
    """The plain classifier of the `basic` and `c1` ablations (the paper's ResNet-18 baseline)."""

    backbone: Backbone = "resnet18"
    pretrained: str = ""


@dataclass
class ModelConfig(Section):
    # full = DCG + MMD; c2 = DCG priors, no MMD; c1 = plain classifier prior; basic = classifier only
    variant: Literal["full", "c2", "c1", "basic"] = "full"
    dcg: DCGConfig = field(default_factory=DCGConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)


@dataclass
class DiffusionConfig(Section):
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    mmd_weight: float = 0.5  # lambda in L_diff
    # The fused prior p: softmax of the fused logits (the authors' code) or the mean of the two
    # streams' softmaxes (the paper's p_T). Used for training and sampling alike.
    fused_prior: Literal["softmax_fused", "mean_softmax"] = "softmax_fused"
    # (t, eps) pairs drawn per image in a training step (the authors: 1). More draws reuse the image
    # encoder and DCG outputs to train the cheap denoiser MLP harder: useful when the encoder dominates.
    noise_draws: int = 1

    def validate(self) -> None:
        _require(self.timesteps >= 2, "timesteps", f"got {self.timesteps}, expected at least 2")
        _require(0 < self.beta_start < 1, "beta_start", f"got {self.beta_start}, expected in (0, 1)")
        _require(self.beta_start <= self.beta_end < 1, "beta_end",
                 f"got {self.beta_end}, expected in [beta_start, 1)")
        _require(self.mmd_weight >= 0, "mmd_weight", f"got {self.mmd_weight}, expected >= 0")
        _require(self.noise_draws >= 1, "noise_draws", f"got {self.noise_draws}, expected at least 1")


@dataclass
class TrainConfig(Section):
    epochs: int = 1000
    max_steps: int = 0  # stop after this many joint steps; 0 = no limit
    batch_size: int = 64  # per device
    grad_accum: int = 1
    dcg_warmup_epochs: int = 10
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    seed: int = 2000
    distributed: Literal["ddp", "deepspeed"] = "ddp"
    deepspeed_config: str = "launch/deepspeed/zero2.json"
    lr: float = 1e-3  # denoiser
    warmup_epochs: int = 40  # linear lr warm-up of the denoiser, then half-cosine to 0
    grad_clip: float = 1.0  # denoiser; 0 disables
    dcg_lr: float = 2e-4
    dcg_amsgrad: bool = True
    dcg_grad_clip: float = 0.0
    ema: bool = True
    ema_rate: float = 0.9999
    val_every: int = 10  # epochs between validations; 0 disables
    select_metric: Literal["accuracy", "macro_f1", "kappa"] = "accuracy"
    # 'val': model selection on the validation split; 'test': the authors' protocol (selects on test)
    select_split: Literal["val", "test"] = "val"
    # Between checkpoints: epochs (1, "2 epochs"), optimizer steps ("500 steps") or wall-clock time ("30m", "2h")
    checkpoint_every: int | str = 1
    keep_last: int = 2
    log_every: int = 10  # steps
    # Experiment trackers through Accelerate ("tensorboard", "wandb", "mlflow", ...); metrics.jsonl always.
    log_with: list[str] = field(default_factory=list)

    def validate(self) -> None:
        for key in ("epochs", "batch_size", "grad_accum", "keep_last", "log_every"):
            _require(getattr(self, key) >= 1, key, f"got {getattr(self, key)}, expected at least 1")
        parse_interval(self.checkpoint_every, "checkpoint_every")
        for key in ("max_steps", "dcg_warmup_epochs", "warmup_epochs", "val_every"):
            _require(getattr(self, key) >= 0, key, f"got {getattr(self, key)}, expected >= 0")
        for key in ("lr", "dcg_lr"):
            _require(getattr(self, key) > 0, key, f"got {getattr(self, key)}, expected > 0")
        # Every generator is seeded from it, NumPy's included, which takes 0 .. 2**32 - 1 only.
        _require(0 <= self.seed < 2**32, "seed", f"got {self.seed}, expected 0 .. {2**32 - 1}")
        for key in ("grad_clip", "dcg_grad_clip"):
            _require(getattr(self, key) >= 0, key, f"got {getattr(self, key)}, expected >= 0 (0 disables)")
        _require(0 <= self.ema_rate < 1, "ema_rate", f"got {self.ema_rate}, expected in [0, 1)")
        unknown = [name for name in self.log_with if name not in TRACKERS]
        _require(not unknown, "log_with", f"got {unknown}, expected trackers among {', '.join(TRACKERS)}")


INTERVAL_UNITS = {"epoch": "epoch", "epochs": "epoch", "step": "step", "steps": "step", "m": "minute",
                  "min": "minute", "minutes": "minute", "h": "hour", "hours": "hour"}


def parse_interval(value: int | str, key: str = "checkpoint_every") -> tuple[int, str]:
    """(count, unit) of an interval: an integer counts epochs; "500 steps", "30m" and "2h" say their unit.
    Hours come back as minutes."""
    if isinstance(value, int):
        count, unit = value, "epoch"
    else:
        match = re.fullmatch(r"\s*(\d+)\s*([a-z]+)\s*", value.lower())
        _require(match is not None and match.group(2) in INTERVAL_UNITS, key,
                 f"got {value!r}; use a number of epochs (2), steps (\"500 steps\") or minutes/hours (\"30m\", \"2h\")")
        count, unit = int(match.group(1)), INTERVAL_UNITS[match.group(2)]
    _require(count >= 1, key, f"got {value!r}, expected at least 1")
    return (count * 60, "minute") if unit == "hour" else (count, unit)


# Inference precisions of `eval.precision` and `--precision`.
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class EvalConfig(Section):
    """How a run is evaluated, declared once: `diffmic eval`, `predict`, validation during training and sweeps all
    sample with these settings, resolved whole (diffmic.evaluation.settings). A field declared with `flag(...)` is
    also an option of `diffmic eval` and `predict`; left unset there, it means the run's own value."""

    # The names diffmic.diffusion.sampler implements.
    sampler: Literal[SAMPLERS] = flag("respaced", "--sampler", "respaced, truncated (the authors') or ddim.")
    steps: int = flag(250, "--steps", "Reverse diffusion steps.")
    n_samples: int = flag(1, "--n-samples", "Chains per image, averaged (their spread is the uncertainty).")
    aggregate: Literal[AGGREGATES] = "mean"  # how several chains per image combine
    # How y_0 becomes class probabilities: the normalised positive part of the chains' mean state, its softmax
    # (the authors' code), or the share of chains voting each class (one-hot with one chain; aggregate: vote).
    probability: Literal[PROBABILITY_RULES] = "positive_part"
    # Divides the chains' mean state before probability: softmax (1: the authors' softmax). It moves no argmax,
    # only the confidence: every evaluation reports `fitted_temperature`, the one that fits its split best.
    temperature: float = flag(1.0, "--temperature", "Temperature of eval.probability: softmax (1: none); fit it on "
                                                     "the val split: `diffmic eval --split val` reports "
                                                     "fitted_temperature.")
    # How uncertain a prediction is (diffmic.diffusion.uncertainty): predictions.csv's uncertainty column,
    # uncertainty_auroc, selective.png and `predict --flag-uncertain` use it. The default is the one that best
    # told wrong predictions from right ones in the README's comparison.
    uncertainty: Literal[UNCERTAINTY_MEASURES] = flag("dcg_entropy", "--uncertainty",
                                                      f"How uncertain a prediction is: {', '.join(MEASURES)}.")
    batch_size: int = 64
    use_ema: bool = flag(True, "--ema/--no-ema", "Use the EMA weights of the denoiser or the raw ones.")
    # Inference precision: bf16 autocast, fp32, or auto (bf16 where the device has native bf16: a GPU with
    # it, or a CPU with avx512_bf16/AMX; fp32 elsewhere).
    precision: Literal[PRECISIONS] = flag("auto", "--precision", "auto (bf16 where the GPU or CPU has native "
                                                                 "bf16, fp32 elsewhere), fp32 or bf16.")
    # Compile one reverse step (the denoiser and the update) into one graph, a CUDA graph on a GPU: faster
    # chains for a run that evaluates many images, after a compile of seconds per batch shape.
    compile: bool = flag(False, "--compile/--no-compile", "Compile one reverse step into one graph (a CUDA graph on "
                                                          "a GPU): faster chains after a compile of seconds.")

    def validate(self) -> None:
        _require(self.steps >= 1, "steps", f"got {self.steps}, expected at least 1")
        _require(self.n_samples >= 1, "n_samples", f"got {self.n_samples}, expected at least 1")
        _require(self.batch_size >= 1, "batch_size", f"got {self.batch_size}, expected at least 1")
        problem = conflict(self.aggregate, self.probability)
        _require(problem is None, "probability", problem or "")
        _require(0 < self.temperature < float("inf"), "temperature",
                 f"got {self.temperature}, expected a positive number")
        _require(self.temperature == 1.0 or self.rule == "softmax", "temperature",
                 f"got {self.temperature}, but a temperature only applies to probability: softmax (the rule in force "
                 f"is {self.rule}); set eval.probability=softmax too")
        _require(not MEASURES[self.uncertainty].needs_chains or self.n_samples > 1, "uncertainty",
                 f"{self.uncertainty!r} is measured across chains, and n_samples is {self.n_samples}; set "
                 f"eval.n_samples=5 (or more) or a measure of the DCG (dcg_entropy)")

    @property
    def rule(self) -> str:
        """The probability rule in force (diffmic.diffusion.probability)."""
        return rule_in_force(self.aggregate, self.probability)


@dataclass
class Config(Section):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        cells = (self.data.image_size // CELL_SIZE) ** 2
        _require(self.model.dcg.k <= cells, "model.dcg.k",
                 f"got {self.model.dcg.k}, but a {self.data.image_size}px input gives a "
                 f"{self.data.image_size // CELL_SIZE}x{self.data.image_size // CELL_SIZE} saliency map "
                 f"with only {cells} cells; use k <= {cells}")
        _require(self.eval.steps <= self.diffusion.timesteps, "eval.steps",
                 f"got {self.eval.steps}, expected at most diffusion.timesteps ({self.diffusion.timesteps})")

    @property
    def uses_diffusion(self) -> bool:
        return self.model.variant != "basic"

    @property
    def uses_dcg(self) -> bool:
        return self.model.variant in ("full", "c2")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _tensorboard_to_log_with(train: dict, value) -> None:
    if value is True and "tensorboard" not in train.setdefault("log_with", []):
        train["log_with"] = [*train["log_with"], "tensorboard"]


# Keys of earlier versions that still load: (section, old key) -> (how it maps onto today's keys, the message).
DEPRECATED_KEYS = {
    ("train", "tensorboard"): (_tensorboard_to_log_with, "train.tensorboard is deprecated: use train.log_with: "
                                                         "[tensorboard] (it is read as that)"),
}


def _migrate(values: dict) -> dict:
    """Rewrites deprecated keys into today's (saying so once per key), so old configs keep loading."""
    import warnings

    for (section, key), (apply, message) in DEPRECATED_KEYS.items():
        part = values.get(section)
        if isinstance(part, dict) and key in part:
            apply(part, part.pop(key))
            warnings.warn(message, FutureWarning, stacklevel=3)
    return values


def flatten(values: dict, prefix: str = "") -> dict:
    """Nested sections as dotted keys, the form of `--set` and of every message: {"train": {"lr": 1}} ->
    {"train.lr": 1}."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_from_dict(values: dict) -> Config:
    if not isinstance(values, dict):
        raise ConfigError("", f"expected a mapping at the top level, got {type(values).__name__}")
    return _from_dict(Config, _migrate(values))


def parse_override(text: str) -> tuple[str, Any]:
    """Splits ``a.b.c=value``; the value is read as YAML so ``4``, ``true`` and ``[1, 2]`` keep their types."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(text, "an override must look like key.subkey=value")
    try:
        return key, yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:  # a stray quote, a tab, or a tag such as !!python/object (never constructed)
        raise ConfigError(key, f"--set {text!r}: the value is not plain YAML ({yaml_problem(error)}); quote it, e.g. "
                               f"--set '{key}=\"...\"'") from None


def yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's many-line message as one line: what went wrong and where."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    for text in overrides:
        key, value = parse_override(text)
        node = values
        *parents, leaf = key.split(".")
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(parents[: i + 1]), "is a value, not a section")
            node = child
        node[leaf] = value
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Reads a YAML config (or the defaults when `path` is None) and applies dotted overrides.

    A config may start from another one: `base: ../ham10000.yaml` (relative to the file) loads that
    file first and lays this file's sections over it, key by key.
    """
    values = _read_yaml(Path(path)) if path is not None else {}
    return config_from_dict(apply_overrides(values, overrides or []))


def config_values(path: str | Path, chain: list[Path] | None = None) -> dict:
    """The values a config file sets, with its `base:` chain merged in and no defaults filled in. `chain`,
    when given, receives the files read: this one first, then its base, and so on."""
    return _read_yaml(Path(path), chain=chain)


def _read_yaml(path: Path, children: tuple[Path, ...] = (), chain: list[Path] | None = None) -> dict:
    if chain is not None:
        chain.append(path)
    if not path.exists():
        raise ConfigError("", f"config file {path} does not exist; pass --config with a file from configs/")
    if not path.is_file():
        raise ConfigError("", f"config file {path} is not a regular file; pass --config with a YAML file from "
                              f"configs/")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError("", f"{path} is not valid YAML: {yaml_problem(error)}") from None
    if not isinstance(values, dict):
        raise ConfigError("", f"{path} must hold sections (data:, model:, ...), not a {type(values).__name__}")
    base = values.pop("base", None)
    if base is None:
        return values
    base_path = (path.parent / str(base)).resolve()
    if base_path in children + (path.resolve(),):
        raise ConfigError("base", f"{path} names {base_path} as its base, which leads back to itself")
    return _merge(_read_yaml(base_path, children + (path.resolve(),), chain), values)


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def config_reference(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, type, default) for every leaf setting: the README's configuration table."""
    rows = []
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(config_reference(hints[f.name], key + "."))
        else:
            rows.append((key, _type_name(hints[f.name]), value))
    return rows


def reference_table() -> str:
    """The README's configuration reference as a Markdown table (regenerate with
    `python -m diffmic.config`; a test fails when the README's copy drifts)."""
    lines = ["| key | type | default |", "|---|---|---|"]
    for key, kind, default in config_reference():
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        lines.append(f"| `{key}` | {kind.replace('|', '/')} | `{shown}` |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_table())
