"""torchxrayvision's chest-X-ray weights as backbones, read without that package and without running its pickles.

``model.pretrained: xrv:densenet121-res224-all`` (or another name in :data:`XRV_WEIGHTS`) reads the file
torchxrayvision downloads, from the folder it downloads into (``~/.torchxrayvision/models_data``; the
package has no environment variable for it); ``xrv:/path/to/file.pt`` reads any file in its formats.

Its DenseNet files are whole pickled modules (``torch.save(model)``), mostly in PyTorch's pre-1.6 format,
whose module records torch's weights-only unpickler cannot read. They are read here by an unpickler that
admits only what such a file holds: torch's tensor rebuild functions and storages, ``OrderedDict`` and
``set``, and the module classes of ``torch.nn``, torchxrayvision and torchvision's ResNet, each mapped to
an inert :class:`PickledModule` that only records the state the file gives it. Any other name in the
pickle is refused, so nothing from the file runs. The state dict is then collected from the modules'
``_parameters`` and ``_buffers``. Its ResNet file is a plain state dict.

Both use torchvision's key names, which are timm's for ``densenet121`` and ``resnet50``; their
classifier and ``op_threshs`` are dropped, and their 1-channel stem adapts to ``in_chans``.

Their preprocessing (torchxrayvision's ``normalize`` then ``XRayCenterCrop`` and ``XRayResizer``): one
grey channel scaled to [-1024, 1024] (``x / 255 * 2048 - 1024``: mean 0.5 and std 1/2048 on [0, 1]
pixels), the centred square of the image, resized to 224 px (512 for the ResNet).
"""

from __future__ import annotations

import collections
import functools
import pickle
import types
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medlens.errors import CheckpointError, ConfigError, WeightsUnavailableError
from medlens.models.sources import XRV_PREFIX
from medlens.models.state_dict import read_state_dict, tensors_only

XRV_RELEASES = "https://github.com/mlmed/torchxrayvision/releases/download/v1/"
XRV_INPUT_SCALING = "[-1024, 1024]"
XRV_RESIZE = "centre-crop"
XRV_INPUT_SIZES = {"densenet121": 224, "resnet50": 512}
"""Input side for a file given by path, by architecture (224 for any other)."""


@dataclass(frozen=True)
class XrvWeights:
    """One of torchxrayvision's released weight sets: its name there, file name, architecture and input side."""

    name: str
    file: str
    architecture: str
    input_size: int


def _densenet(name: str, trained_on: str) -> XrvWeights:
    file = f"{trained_on}-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
    return XrvWeights(f"densenet121-res224-{name}", file, "densenet121", 224)


XRV_WEIGHTS: dict[str, XrvWeights] = {
    w.name: w
    for w in (
        _densenet("all", "nih-pc-chex-mimic_ch-google-openi-kaggle"),
        _densenet("nih", "nih"),
        _densenet("pc", "pc"),
        _densenet("chex", "chex"),
        _densenet("rsna", "kaggle"),
        _densenet("mimic_nb", "mimic_nb"),
        _densenet("mimic_ch", "mimic_ch"),
        XrvWeights("resnet50-res512-all", "pc-nih-rsna-siim-vin-resnet50-test512-e400-state.pt", "resnet50", 512),
    )
}
"""torchxrayvision's ``model_urls`` names, with the file names it downloads them as."""
DROPPED_KEYS = ("op_threshs",)
"""torchxrayvision's operating-point buffer: it belongs to its classifier, which is dropped too."""


def xrv_folder() -> Path:
    """Where torchxrayvision keeps downloaded weights (its ``utils.get_cache_dir()``)."""
    return Path("~/.torchxrayvision/models_data").expanduser()


def find_xrv_weights(pretrained: str, architecture: str) -> tuple[Path, XrvWeights | None]:
    """The file ``xrv:<name>`` or ``xrv:<path>`` names, and its release if it is a known one.

    Raises ConfigError for an unknown name or one for another architecture, and WeightsUnavailableError
    (saying where to put the file) when a named file is not there.
    """

    target = pretrained.removeprefix(XRV_PREFIX)
    if target in XRV_WEIGHTS:
        release = XRV_WEIGHTS[target]
        if release.architecture != architecture:
            raise ConfigError(
                f"{pretrained} holds {release.architecture} weights, not {architecture}: set model.name: "
                f"{release.architecture}"
            )
        path = xrv_folder() / release.file
        if not path.is_file():
            raise WeightsUnavailableError(
                f"torchxrayvision weights {target} not found: put {release.file} (from {XRV_RELEASES}{release.file}) "
                f"in {xrv_folder()}/, or pass model.pretrained: xrv:/path/to/{release.file}"
            )
        return path, release
    path = Path(target).expanduser()
    if not path.is_file():
        if "/" not in target and not path.suffix:
            raise ConfigError(
                f"unknown torchxrayvision weights {target!r}; choose one of {', '.join(XRV_WEIGHTS)}, "
                "or pass a file as xrv:/path/to/weights.pt"
            )
        raise CheckpointError(f"torchxrayvision weights file {str(path)!r} not found")
    known = {release.file: release for release in XRV_WEIGHTS.values()}
    return path, known.get(path.name)


def input_size_for(release: XrvWeights | None, architecture: str) -> int:
    return release.input_size if release else XRV_INPUT_SIZES.get(architecture, 224)


def read_xrv_state(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a torchxrayvision file and its format: ``xrv-module`` (pickled module) or ``xrv-state-dict``."""

    if path.suffix == ".safetensors":
        return _without_dropped(read_state_dict(path)), "xrv-state-dict"
    if zipfile.is_zipfile(path) and _is_torchscript(path):
        raise CheckpointError(f"{path}: refused: a TorchScript archive holds code, not just torchxrayvision weights")
    try:
        with warnings.catch_warnings():
            # The pre-1.6 format records each module class's source; a stand-in has none to compare.
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code", category=UserWarning)
            # weights_only=False only because torch's weights-only unpickler refuses that format's module
            # records; the unpickler passed here admits nothing but the names in _admitted().
            loaded = torch.load(path, map_location="cpu", pickle_module=_RESTRICTED_PICKLE, weights_only=False)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: {exc}, and a torchxrayvision weights file holds only tensors and torch.nn "
            "or torchxrayvision modules; nothing else a pickle names is admitted, so nothing in it ran"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch file ({type(exc).__name__}: {exc})") from None
    if isinstance(loaded, PickledModule):
        return _without_dropped(module_state(path, loaded)), "xrv-module"
    return _without_dropped(tensors_only(path, loaded)), "xrv-state-dict"


class PickledModule:
    """Stands in for one module class a weights file names: it only records the state the file gives it."""

    pickled_as = ""

    def __repr__(self) -> str:
        return f"<{self.pickled_as} read from a weights file>"


def module_state(path: Path, root: PickledModule) -> dict[str, torch.Tensor]:
    """A state dict from pickled modules: each one's ``_parameters`` and persistent ``_buffers``, by path."""
    state: dict[str, torch.Tensor] = {}
    pending: list[tuple[str, Any]] = [("", root)]
    while pending:
        prefix, module = pending.pop()
        if not isinstance(module, PickledModule):
            where = prefix.rstrip(".") or "the root"
            raise CheckpointError(f"{path}: {where} is a {type(module).__name__}, not a module")
        found = vars(module)
        transient = found.get("_non_persistent_buffers_set") or set()
        tensors = {**(found.get("_parameters") or {}), **{
            name: value for name, value in (found.get("_buffers") or {}).items() if name not in transient
        }}
        for name, value in tensors.items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{path}: {prefix}{name} is a {type(value).__name__}, not a tensor")
            state[prefix + name] = value.detach()
        pending += [(f"{prefix}{name}.", child) for name, child in (found.get("_modules") or {}).items() if child]
    if not state:
        raise CheckpointError(f"{path}: the pickled {root.pickled_as} holds no tensors")
    return state


def _without_dropped(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in DROPPED_KEYS}


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


_MODULE_CLASSES = (
    "torchxrayvision.models.DenseNet",
    "torchxrayvision.models.ResNet",
    "torchxrayvision.models._DenseLayer",
    "torchxrayvision.models._DenseBlock",
    "torchxrayvision.models._Transition",
    "torchvision.models.resnet.ResNet",
    "torchvision.models.resnet.Bottleneck",
    "torchvision.models.resnet.BasicBlock",
)


@functools.cache
def _admitted() -> dict[str, Any]:
    """Every global such a pickle may name, by ``module.name``; module classes map to stand-ins."""
    torch_modules = [f"{c.__module__}.{c.__qualname__}" for c in vars(nn).values() if _is_module_class(c)]
    stand_ins = {
        name: type(name.rsplit(".", 1)[1], (PickledModule,), {"pickled_as": name})
        for name in (*torch_modules, *_MODULE_CLASSES)
    }
    rebuild = [
        torch._utils._rebuild_tensor,
        torch._utils._rebuild_tensor_v2,
        torch._utils._rebuild_parameter,
        torch._utils._rebuild_parameter_with_state,
    ]
    return {
        **stand_ins,
        **{f"torch._utils.{f.__name__}": f for f in rebuild},
        "collections.OrderedDict": collections.OrderedDict,
        "builtins.set": set,
        # Old torch.nn modules kept their backend; torch keeps this no-op for unpickling them.
        "torch.nn.backends.thnn._get_thnn_function_backend": _no_backend,
    }


def _is_module_class(candidate: object) -> bool:
    return isinstance(candidate, type) and issubclass(candidate, nn.Module)


def _no_backend() -> None:
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    """Looks every global up in :func:`_admitted`, never imports one (torch maps storage names first)."""

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module  # protocol 2 writes Python 2's name
        try:
            return _admitted()[f"{module}.{name}"]
        except KeyError:
            raise pickle.UnpicklingError(f"it names {module}.{name}") from None


def _load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


_RESTRICTED_PICKLE = types.ModuleType("medlens_restricted_pickle")
_RESTRICTED_PICKLE.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
_RESTRICTED_PICKLE.load = _load  # type: ignore[attr-defined]
