"""Checkpoints that describe themselves, written atomically, loaded without unpickling anything.

A checkpoint is a folder: ``model.safetensors`` (weights) and ``manifest.json`` (config, label list,
preprocessing, model name, thresholds, temperature, metrics, versions). A training checkpoint also holds
``training_state.safetensors`` + ``training_state.json`` (optimizer and scheduler state, epoch, history) so
``--resume`` continues exactly. A folder is written beside its target and swapped in with renames, so a
crash at any moment leaves either the old or the new checkpoint complete, never a broken one.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medlens import __version__
from medlens.errors import CheckpointError
from medlens.io import write_atomic

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    import timm

    return {
        "medlens": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def save_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    manifest: Mapping[str, Any],
    training_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``folder`` atomically: a temporary sibling is filled, fsynced, then renamed into place."""
    folder = Path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    except OSError as exc:
        raise _write_error(folder, exc) from exc
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / WEIGHTS))
        full = {
            "format_version": FORMAT_VERSION,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "versions": versions(),
            **manifest,
        }
        _write_json(tmp / MANIFEST, full)
        if training_state is not None:
            tensors, plain = _split_state(training_state)
            save_file(tensors, str(tmp / STATE_TENSORS))
            _write_json(tmp / STATE_JSON, plain)
        for path in tmp.iterdir():
            _fsync(path)
        _swap_in(tmp, folder)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError | SafetensorError):  # safetensors reports a full disk as SafetensorError
            raise _write_error(folder, exc) from exc
        raise
    return folder


def _write_error(folder: Path, exc: Exception) -> CheckpointError:
    problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return CheckpointError(
        f"cannot write the checkpoint {folder} ({problem}); any previous checkpoint there is left as it was"
    )


def _swap_in(tmp: Path, folder: Path) -> None:
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(folder, old)
    os.replace(tmp, folder)
    _fsync(folder.parent)
    if old.exists():
        shutil.rmtree(old)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder or a run folder (its ``best/``, else ``last/``)."""
    path = Path(path)
    for candidate in (path, path / "best", path / "last"):
        if (candidate / MANIFEST).is_file() and (candidate / WEIGHTS).is_file():
            return candidate
        # A crash between the two renames of _swap_in leaves only the previous checkpoint, under .old.
        old = candidate.with_name(candidate.name + ".old")
        if not candidate.exists() and (old / MANIFEST).is_file() and (old / WEIGHTS).is_file():
            return old
    raise CheckpointError(
        f"{path} is not a checkpoint: expected {MANIFEST} and {WEIGHTS} in it, or a run folder with best/ or last/"
    )


def read_manifest(folder: str | Path) -> dict[str, Any]:
    folder = resolve_checkpoint(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder / MANIFEST}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or "model" not in manifest or "labels" not in manifest:
        raise CheckpointError(f"{folder / MANIFEST}: manifest lacks 'model' or 'labels'")
    return manifest


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The weights as tensors; safetensors holds data only, so loading cannot run code."""
    path = resolve_checkpoint(folder) / WEIGHTS
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from None


def load_training_state(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    try:
        plain = json.loads((folder / STATE_JSON).read_text())
        tensors = load_file(str(folder / STATE_TENSORS))
    except (OSError, json.JSONDecodeError, SafetensorError) as exc:
        raise CheckpointError(f"{folder}: no usable training state to resume from ({exc})") from None
    return _join_state(plain, tensors)


def update_manifest(folder: str | Path, **fields: Any) -> None:
    """Add or replace manifest fields, atomically (the weights are left as they are)."""
    folder = resolve_checkpoint(folder)
    manifest = read_manifest(folder)
    manifest.update(fields)
    _write_json(folder / MANIFEST, manifest)


def _write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=_jsonable), durable=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} into a checkpoint manifest")


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_TENSOR = "__tensor__"


def _split_state(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], Any]:
    """Nested state -> (flat tensors, JSON with placeholders): optimizer state without pickle."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().contiguous()
            return {_TENSOR: key}
        if isinstance(value, Mapping):
            return {
                "__dict__": [[walk(k, f"{key}.k{i}"), walk(v, f"{key}.{i}")] for i, (k, v) in enumerate(value.items())]
            }
        if isinstance(value, list | tuple):
            return [walk(v, f"{key}.{i}") for i, v in enumerate(value)]
        return value

    return tensors, walk(dict(state), "s")


def _join_state(plain: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(plain, dict):
        if _TENSOR in plain:
            return tensors[plain[_TENSOR]]
        if "__dict__" in plain:
            return {_join_state(k, tensors): _join_state(v, tensors) for k, v in plain["__dict__"]}
        return {k: _join_state(v, tensors) for k, v in plain.items()}
    if isinstance(plain, list):
        return [_join_state(v, tensors) for v in plain]
    return plain
