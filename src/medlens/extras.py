"""Optional parts of medlens and the pip extra that installs each; a missing one is named in one line.

The core (data, training, evaluation, heatmaps, predict) needs none of them. Modules import an optional
package through :func:`require` where it is first used, never at import time, so that the core commands
work without it and a command that needs it says which extra to install.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from medlens.errors import MedlensError

EXTRAS = {
    "faces": "face detection (dlib)",
    "serve": "medlens serve",
    "onnx": "the ONNX backend",
    "tune": "medlens tune",
    "fast-png": "the fast PNG decoder",
}
"""Each extra of ``pip install 'medlens[...]'`` (besides ``all`` and ``dev``) and what needs it."""


class MissingExtraError(MedlensError, ImportError):
    """An optional package is not installed; the message names the extra that brings it."""


def install_hint(extra: str) -> str:
    return f"pip install 'medlens[{extra}]'"


def require(module: str, extra: str) -> ModuleType:
    """``module`` imported, or :class:`MissingExtraError` saying which extra installs it."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; extras: {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(f"{EXTRAS[extra]} needs the {extra!r} extra: {install_hint(extra)} ({exc})") from None


def installed(*modules: str) -> bool:
    """Whether every one of ``modules`` can be found, without importing any of them."""
    return all(importlib.util.find_spec(module) is not None for module in modules)
