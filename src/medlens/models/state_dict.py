"""Reading a weights file as tensors only: safetensors, or a PyTorch state dict with ``weights_only=True``.

No code inside a file ever runs; a file that holds Python objects is refused, naming what it holds.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from medlens.errors import CheckpointError, ConfigError
from medlens.models.sources import WEIGHT_SUFFIXES


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a PyTorch state dict, never unpickling code."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"pretrained weights file {str(path)!r} not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except SafetensorError as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ConfigError(f"{path}: unsupported weights file type {path.suffix!r}; use {WEIGHT_SUFFIXES}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"WeightsUnpickler error: ([^.\n]*)", str(exc))
        xrv = f"; read a torchxrayvision file as model.pretrained: xrv:{path}" if "torchxrayvision" in str(exc) else ""
        raise CheckpointError(
            f"{path}: refused to load: it holds Python objects, not just tensors, and loading them could run "
            f"code ({found.group(1) if found else exc}). Re-save the plain state dict, ideally as .safetensors{xrv}"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch file ({exc})") from None
    return tensors_only(path, loaded)


def tensors_only(path: Path, loaded: Any) -> dict[str, torch.Tensor]:
    """The state dict itself, also when a training checkpoint nests it under ``state_dict`` or ``model``."""
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        found = sorted(loaded)[:5] if isinstance(loaded, dict) else type(loaded).__name__
        raise CheckpointError(f"{path}: expected a state dict of tensors, found {found}")
    return loaded
