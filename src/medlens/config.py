"""Typed settings for data, model, faces and training: YAML in, YAML saved beside each run.

One ``Config`` describes every kind of run: a network fine-tuned end to end or in part (``model.strategy``
``full``, ``last_n``, ``head``), and a probe (``strategy: probe``): frozen embeddings from ``model.name``,
which may be a face embedder (``dlib_face``, aligned by the ``faces`` settings), under a classical head
(``model.probe``).

Every key can be overridden from the command line as ``--set section.key=value`` (the value is parsed as
YAML, so ``--set train.lr=1e-3`` is a float and ``--set model.pretrained=false`` a bool). Unknown keys are
errors that name the key and the valid ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medlens.data.transforms import AUTO_CROP, CONTRASTS, MAX_CROP_FRACTION
from medlens.errors import ConfigError

PHANTOMS = "phantoms"
"""``data.source`` value meaning: generate the synthetic phantom set into the run folder."""


@dataclass
class PhantomConfig:
    n: int = 400
    task: str = "multilabel"
    size: int = 256
    seed: int = 0


@dataclass
class DataConfig:
    source: str = PHANTOMS
    format: str | None = None
    image_size: int = 224
    channels: int = 1
    val_fraction: float = 0.1
    test_fraction: float = 0.15
    views: list[str] | None = None
    undersample: str | None = None
    undersample_keep: float = 0.2
    cache: str | None = None
    contrast: str = "none"
    crop_border: float | str = 0.0
    phantoms: PhantomConfig = field(default_factory=PhantomConfig)


@dataclass
class ModelConfig:
    name: str = "resnet50"
    pretrained: bool | str = False
    strategy: str = "full"
    last_n: int = 0
    head: str = "linear"
    head_hidden: list[int] = field(default_factory=list)
    head_dropout: float = 0.0
    drop_rate: float = 0.0
    # What the weights expect of an input, where they do not say it themselves (None: what they say).
    mean: list[float] | None = None
    std: list[float] | None = None
    input_size: int | None = None
    probe: str = "svm"
    """The classical head of ``strategy: probe``."""
    probe_params: dict[str, Any] = field(default_factory=dict)
    """Its constructor arguments, e.g. ``{C: 1.0, class_weight: balanced}``."""


DETECTORS = ("hog", "cnn")


@dataclass(frozen=True)
class FacesConfig:
    """How faces are found and aligned for a face embedder; saved in its checkpoints so predictions align as
    training did.

    ``detector`` is ``hog`` (fast, frontal faces) or ``cnn`` (MMOD: more poses, much slower on CPU).
    ``upsample`` doubles the image that many times before detecting, finding faces down to ~40 px (1) or
    ~20 px (2) at 4x the time per step. The chip is ``chip_size`` pixels square with ``chip_padding`` of
    the face width around it: 150 and 0.25 are what dlib's descriptor was trained on.
    """

    detector: str = "hog"
    upsample: int = 1
    chip_size: int = 150
    chip_padding: float = 0.25

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ConfigError(f"unknown face detector {self.detector!r}; valid detectors: {', '.join(DETECTORS)}")
        if not isinstance(self.upsample, int) or not 0 <= self.upsample <= 3:
            raise ConfigError(f"face detector upsample must be an integer in 0..3, got {self.upsample!r}")
        if not isinstance(self.chip_size, int) or self.chip_size < 32:
            raise ConfigError(f"face chip_size must be an integer >= 32 pixels, got {self.chip_size!r}")
        if not 0.0 <= self.chip_padding <= 1.0:
            raise ConfigError(f"face chip_padding must be in [0, 1], got {self.chip_padding!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FacesConfig:
        """Settings from a manifest; unknown keys are errors naming the valid ones."""
        return _build(cls, values, "faces.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def tag(self) -> str:
        """A file-name-safe summary, e.g. ``hog-up1-chip150-pad0.25``."""
        return f"{self.detector}-up{self.upsample}-chip{self.chip_size}-pad{self.chip_padding:g}"


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    backbone_lr_mult: float = 1.0
    scheduler: str = "plateau"
    plateau_factor: float = 0.1
    plateau_patience: int = 2
    warmup_epochs: int = 0
    early_stopping: int = 0
    best_metric: str = "val_loss"
    class_weights: bool = False
    label_smoothing: float = 0.0
    pos_weighting: bool = True
    augment: str = "xray"
    augment_strength: float = 1.0
    seed: int = 0
    threshold_method: str = "youden"
    export_onnx: bool = True
    device: str = "auto"
    """auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps; ``--device`` on the command line."""
    precision: str = "auto"
    """auto (bf16 on CUDA GPUs that have it, else fp16 there; fp32 on CPU and MPS), 32, bf16, 16."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    faces: FacesConfig = field(default_factory=FacesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


CHOICES = {
    "model.strategy": ("head", "full", "last_n", "probe"),
    "train.optimizer": ("sgd", "adam", "adamw"),
    "train.scheduler": ("plateau", "cosine", "none"),
    "train.best_metric": ("val_loss", "val_auc", "val_accuracy"),
    "train.augment": ("xray", "face", "none"),
    "train.threshold_method": ("youden", "sensitivity"),
    "data.format": (None, "folder", "nih", "csv"),
    "data.channels": (1, 3),
    "model.head": ("linear", "mlp"),
    "data.phantoms.task": ("multiclass", "multilabel"),
    "data.contrast": CONTRASTS,
    "train.precision": ("auto", "32", "bf16", "16"),
}


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (safely), apply ``key=value`` overrides, and check every key and choice."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config is a mapping of sections (data, model, faces, train)")
        raw = loaded or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.lr=1e-3)")
        set_dotted(raw, key.strip(), yaml.safe_load(value) if value else None)
    config = _build(Config, raw, "")
    _check_choices(config)
    check_split(config.data)
    check_last_n(config.model.strategy, config.model.last_n)
    return config


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
    node[parts[-1]] = value


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, not {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = prefix.rstrip(".") or "top level"
        valid = ", ".join(prefix + name for name in fields)
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r} ({where}); valid keys: {valid}")
    values = {}
    for name, value in raw.items():
        kind = fields[name].type
        nested = _dataclass_of(kind)
        if nested is not None:
            values[name] = _build(nested, value or {}, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, kind, prefix + name)
    return cls(**values)


def _dataclass_of(kind: Any) -> type | None:
    names = {c.__name__: c for c in (PhantomConfig, DataConfig, ModelConfig, FacesConfig, TrainConfig)}
    return names.get(kind if isinstance(kind, str) else getattr(kind, "__name__", ""))


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Check a YAML value against the annotation (a string under ``from __future__ import annotations``)."""
    kind = str(kind)
    allowed = [k.strip() for k in kind.split("|")]
    if value is None:
        if "None" in allowed:
            return None
        raise ConfigError(f"{key} needs a value of type {kind}")
    if "bool" in allowed and isinstance(value, bool):
        return value
    if "int" in allowed and isinstance(value, int) and not isinstance(value, bool):
        return value
    if "float" in allowed and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if "float" in allowed and isinstance(value, str):
        # YAML 1.1 reads 1e-4 (no dot) as a string; practitioners write learning rates that way.
        try:
            return float(value)
        except ValueError:
            pass
    if "str" in allowed and isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    if any(a.startswith("list[") for a in allowed) and isinstance(value, list):
        return list(value)
    if any(a.startswith("dict[") for a in allowed) and isinstance(value, Mapping):
        return dict(value)
    raise ConfigError(f"{key} must be {kind}, got {value!r}")


def check_split(data: DataConfig) -> None:
    """The split fractions leave images to train and to validate on (a test split is optional)."""
    if not (data.val_fraction > 0 and data.test_fraction >= 0 and data.val_fraction + data.test_fraction < 1):
        raise ConfigError(
            f"data.val_fraction={data.val_fraction} and data.test_fraction={data.test_fraction} must leave images "
            "to train and validate on: val_fraction > 0, test_fraction >= 0 and their sum below 1"
        )


def check_last_n(strategy: str, last_n: int) -> None:
    """``last_n`` is set exactly when the strategy uses it (its upper bound depends on the architecture)."""
    if strategy != "last_n" and last_n:
        raise ConfigError(
            f"last_n={last_n} only applies to strategy 'last_n', not {strategy!r}: set one or the other"
        )


def _check_choices(config: Config) -> None:
    for key, valid in CHOICES.items():
        node: Any = config
        for part in key.split("."):
            node = getattr(node, part)
        if node not in valid:
            shown = ", ".join(str(v) for v in valid if v is not None)
            raise ConfigError(f"{key}={node!r} is not valid; choose one of: {shown}")
    crop = config.data.crop_border
    if crop != AUTO_CROP and (isinstance(crop, str) or not 0.0 <= crop < MAX_CROP_FRACTION):
        raise ConfigError(
            f"data.crop_border={crop!r} is not valid; use {AUTO_CROP!r} or a fraction of each side in "
            f"[0, {MAX_CROP_FRACTION})"
        )
