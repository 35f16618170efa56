"""Pretrained backbone weights: from a local file (offline, safe), torchxrayvision's, or the Hugging Face hub.

A local file is ``.safetensors`` or a PyTorch state dict (``.pt``/``.pth``/``.bin``) read with
``torch.load(weights_only=True)``, so no code inside it ever runs; ``xrv:...`` names torchxrayvision's
files, read as :mod:`medlens.models.xrv` says. Keys are mapped onto the timm backbone: wrapper prefixes
(``module.``, ``model.``, ``backbone.``) are stripped, the original classifier is dropped (the medlens head
is always freshly initialised), and the stem is adapted to the model's ``in_chans``. Every backbone weight
must be present; extra keys are reported in a warning. What the weights expect of an input comes with
them (:mod:`medlens.models.preprocessing`), and each read says where they came from (source, format,
SHA-256): the record ``Classifier.weights_info`` keeps for a checkpoint's manifest.

Hub weights need a network. Where there is none, medlens notices within about a second, switches the hub
client to offline mode (a copy already in the hub cache still loads) and otherwise raises
:class:`WeightsUnavailableError`, saying how to pass a local file instead.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from medlens.errors import CheckpointError, WeightsUnavailableError
from medlens.io import file_sha256
from medlens.models.preprocessing import read_sidecar, sidecar_path
from medlens.models.sources import (
    LOCAL_FILE_HINT,
    XRV_PREFIX,
    hub_model_name,
    hub_reachable,
    is_xrv,
    use_hub_offline,
)
from medlens.models.state_dict import read_state_dict
from medlens.models.xrv import (
    XRV_INPUT_SCALING,
    XRV_RESIZE,
    find_xrv_weights,
    input_size_for,
    read_xrv_state,
)

log = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("module.", "model.", "backbone.")


@dataclass(frozen=True)
class LocalWeights:
    """A local weights file read: its tensors, its record, and the preprocessing its format and sidecar imply."""

    path: Path
    state: dict[str, torch.Tensor] = field(repr=False)
    info: dict[str, str | None]
    """``source`` (as configured, or the file), ``format`` and ``sha256`` of the file: the manifest's record."""
    implied: dict[str, Any] = field(default_factory=dict)
    """Preprocessing the format implies (torchxrayvision's), keys as in a sidecar."""
    sidecar: dict[str, Any] | None = None


def backbone_state(state: dict[str, torch.Tensor], classifier: str) -> dict[str, torch.Tensor]:
    """Keys renamed to the timm backbone's, with the file's own classifier (or medlens head) dropped."""
    medlens_file = any(key.removeprefix("module.").startswith("backbone.") for key in state)
    kept, dropped = {}, []
    for key, value in state.items():
        name = _strip_wrappers(key)
        own_head = medlens_file and not key.removeprefix("module.").startswith("backbone.")
        if own_head or name.startswith(f"{classifier}."):
            dropped.append(key)
        else:
            kept[name] = value
    if dropped:
        log.info("dropped %d classifier weights (%s, ...); the head starts fresh", len(dropped), dropped[0])
    return kept


def _strip_wrappers(key: str) -> str:
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def read_local_weights(pretrained: str | Path, architecture: str) -> LocalWeights:
    """Read a local file or ``xrv:...`` weights meant for the timm ``architecture``, with its sidecar.

    Everything that can be wrong with the file is found here, before any model is built.
    """
    implied: dict[str, Any] = {}
    if is_xrv(pretrained):
        path, release = find_xrv_weights(str(pretrained), architecture)
        state, form = read_xrv_state(path)
        named = release is not None and pretrained == f"{XRV_PREFIX}{release.name}"
        source = str(pretrained) if named else f"{XRV_PREFIX}{path}"
        implied = {
            "input_scaling": XRV_INPUT_SCALING,
            "input_size": input_size_for(release, architecture),
            "resize": XRV_RESIZE,
        }
    else:
        path = Path(pretrained).expanduser()
        state = read_state_dict(path)
        form, source = ("timm-safetensors" if path.suffix == ".safetensors" else "timm-state-dict"), str(path)
    sidecar = read_sidecar(path)
    if sidecar and sidecar.get("architecture") not in (None, architecture):
        raise CheckpointError(
            f"{sidecar_path(path)} says these are {sidecar['architecture']} weights, not {architecture}: set "
            f"model.name: {sidecar['architecture']}, or correct the sidecar"
        )
    return LocalWeights(path, state, {"source": source, "format": form, "sha256": file_sha256(path)}, implied, sidecar)


def hub_weights_info(backbone: nn.Module, hub_name: str | None) -> dict[str, str | None]:
    """The record of hub weights: the repo asked for, else the timm tag that was fetched."""
    cfg = backbone.pretrained_cfg
    tag = f".{cfg['tag']}" if cfg.get("tag") else ""
    return {"source": hub_name or f"timm/{cfg['architecture']}{tag}", "format": "hub", "sha256": None}


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a local weights file into a timm backbone, strictly: every backbone weight must be there."""
    load_state(backbone, read_state_dict(path), path)


def load_state(backbone: nn.Module, loaded: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load the tensors read from ``path`` into a timm backbone, strictly: every backbone weight must be there."""
    cfg = backbone.pretrained_cfg
    arch = cfg.get("architecture", type(backbone).__name__)
    state = backbone_state(loaded, cfg["classifier"])
    expected = backbone.state_dict()
    _adapt_stem(state, expected, f"{cfg['first_conv']}.weight")

    # Old BatchNorm exports lack the step counter; it is bookkeeping, not a weight.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise CheckpointError(
            f"{path} lacks {len(missing)} of the {len(expected)} {arch} backbone weights, e.g. {missing[:4]}; "
            f"is it a {arch} checkpoint? Keys it has that {arch} does not: {unexpected[:4]}"
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if wrong:
        raise CheckpointError(f"{path}: {len(wrong)} weights do not fit {arch}'s shapes, e.g. {wrong[:3]}")
    if unexpected:
        warnings.warn(
            f"{path}: ignoring {len(unexpected)} weights {arch} does not have, e.g. {unexpected[:4]}",
            stacklevel=3,
        )
    backbone.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def _adapt_stem(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], key: str) -> None:
    """Fold a first conv's input channels (RGB -> 1, 1 -> 3) into the model's, as timm does for its weights."""
    if key in state and key in expected and state[key].shape[1] != expected[key].shape[1]:
        base_chans, in_chans = state[key].shape[1], expected[key].shape[1]
        log.info("adapting %s from %d to %d input channels", key, base_chans, in_chans)
        state[key] = timm.models.adapt_input_conv(in_chans, state[key], base_chans=base_chans)


def create_from_hub(timm_name: str, hub_name: str | None, **timm_kwargs: Any) -> nn.Module:
    """``timm.create_model`` with hub weights: timm's default for ``timm_name`` or the repo ``hub_name``."""
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    model_name, overlay = hub_model_name(timm_name, hub_name)
    source = hub_name or f"timm's default weights for {timm_name}"
    if not hub_reachable():
        use_hub_offline()
    try:
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **timm_kwargs)
    except (EntryNotFoundError, HfHubHTTPError, ConnectionError) as exc:  # offline mode is a ConnectionError
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        raise WeightsUnavailableError(
            f"cannot fetch {source} from the Hugging Face hub ({reason}). Download the weights where there "
            f"is a network and pass the local file instead: {LOCAL_FILE_HINT}"
        ) from None
