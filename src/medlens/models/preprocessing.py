"""The preprocessing a model's weights expect, and where that knowledge came from.

Hub weights carry it in timm's ``pretrained_cfg``; torchxrayvision's weights in that package's own
conventions; a local weights file in a JSON sidecar beside it (``weights.pt`` -> ``weights.pt.json``) or
in the config's ``model.mean`` / ``model.std`` / ``model.input_size``. Explicit config keys win over a
sidecar, a sidecar over what the weights imply, and those over the architecture's ImageNet defaults.

Every input is read as uint8, scaled to [0, 1] (``x / 255``) and normalised as ``(x - mean) / std``: a
named :data:`INPUT_SCALINGS` range is one such mean and std.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medlens.data.transforms import RESIZE_MODES
from medlens.errors import CheckpointError

INPUT_SCALINGS: dict[str, tuple[float, float]] = {
    "[0, 1]": (0.0, 1.0),
    "[-1, 1]": (0.5, 0.5),
    "[-1024, 1024]": (0.5, 1.0 / 2048.0),  # torchxrayvision's x / 255 * 2048 - 1024
}
"""A named range of model inputs, as the (mean, std) that maps [0, 1] pixels onto it on every channel."""

SIDECAR_SUFFIX = ".json"
SIDECAR_KEYS = ("architecture", "mean", "std", "input_scaling", "input_size", "resize")


@dataclass(frozen=True)
class Preprocessing:
    """What an image needs before the model sees it; :meth:`to_dict` is what a checkpoint manifest records."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int]
    resize: str = "squash"
    """One of :data:`medlens.data.transforms.RESIZE_MODES`: ``squash``, or ``centre-crop`` then resize."""
    input_scaling: str | None = None
    """The :data:`INPUT_SCALINGS` name the weights were described by, if they named one."""
    source: str = "architecture"
    """Who said so: ``architecture`` (timm's defaults), ``hub``, ``torchxrayvision``, ``sidecar``, ``config``."""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std), "input_size": list(self.input_size)}

    def updated(self, source: str, in_chans: int, settings: Mapping[str, Any], error: type[Exception]) -> Preprocessing:
        """This preprocessing with ``settings`` (keys as in a sidecar, ``None`` = keep) applied, said by ``source``.

        ``error`` is raised for a bad value: ConfigError for config keys, CheckpointError for a sidecar.
        """
        given = {k: v for k, v in settings.items() if v is not None and k != "architecture"}
        if not given:
            return self
        mean, std, scaling = given.get("mean"), given.get("std"), given.get("input_scaling")
        if scaling is not None:
            if mean is not None or std is not None:
                raise error(f"{source}: give input_scaling or mean and std, not both")
            if scaling not in INPUT_SCALINGS:
                raise error(f"{source}: input_scaling {scaling!r} is not one of {', '.join(INPUT_SCALINGS)}")
            mean, std = ([value] for value in INPUT_SCALINGS[scaling])
        elif mean is None and std is None:
            scaling = self.input_scaling
        resize = given.get("resize", self.resize)
        if resize not in RESIZE_MODES:
            raise error(f"{source}: resize {resize!r} is not one of {', '.join(RESIZE_MODES)}")
        size = given.get("input_size")
        return Preprocessing(
            mean=self.mean if mean is None else channel_stats(_numbers(mean, "mean", source, error), in_chans),
            std=self.std if std is None else channel_stats(_positive(std, source, error), in_chans),
            input_size=self.input_size if size is None else _side(size, source, error),
            resize=resize,
            input_scaling=scaling,
            source=source,
        )


def from_pretrained_cfg(cfg: Mapping[str, Any], in_chans: int, image_size: int | None, source: str) -> Preprocessing:
    """timm's ``pretrained_cfg`` normalisation and input size; ``image_size`` (medlens's default) wins."""
    return Preprocessing(
        mean=channel_stats(cfg["mean"], in_chans),
        std=channel_stats(cfg["std"], in_chans),
        input_size=(image_size, image_size) if image_size else tuple(cfg["input_size"][1:]),
        source=source,
    )


def channel_stats(stats: Sequence[float], in_chans: int) -> tuple[float, ...]:
    """Normalisation for ``in_chans``: as is when the counts agree, else their mean on every channel."""
    if len(stats) == in_chans:
        return tuple(float(s) for s in stats)
    return (sum(stats) / len(stats),) * in_chans


def sidecar_path(weights: Path) -> Path:
    return weights.with_name(weights.name + SIDECAR_SUFFIX)


def read_sidecar(weights: Path) -> dict[str, Any] | None:
    """The JSON sidecar beside ``weights``, checked key by key; ``None`` if there is none."""
    path = sidecar_path(weights)
    if not path.is_file():
        return None
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON sidecar ({exc})") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: a sidecar is one JSON object with keys among {', '.join(SIDECAR_KEYS)}")
    unknown = sorted(set(loaded) - set(SIDECAR_KEYS))
    if unknown:
        raise CheckpointError(f"{path}: unknown key {unknown[0]!r}; valid keys: {', '.join(SIDECAR_KEYS)}")
    architecture = loaded.get("architecture")
    if architecture is not None and not isinstance(architecture, str):
        raise CheckpointError(f"{path}: architecture must be a timm model name, got {architecture!r}")
    return loaded


def _numbers(values: Any, key: str, source: str, error: type[Exception]) -> list[float]:
    ok = isinstance(values, list | tuple) and values and all(_is_number(v) for v in values)
    if not ok or len(values) not in (1, 3):
        raise error(f"{source}: {key} must be a list of 1 or 3 numbers (per channel), got {values!r}")
    return [float(v) for v in values]


def _positive(values: Any, source: str, error: type[Exception]) -> list[float]:
    numbers = _numbers(values, "std", source, error)
    if not all(v > 0 for v in numbers):
        raise error(f"{source}: std must be positive, got {values!r}")
    return numbers


def _side(size: Any, source: str, error: type[Exception]) -> tuple[int, int]:
    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        raise error(f"{source}: input_size must be a side in pixels (at least 8), got {size!r}")
    return size, size


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
