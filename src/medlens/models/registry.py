"""The backbones medlens names itself, and any other timm model by its own name.

Configs and the CLI say ``densenet121``, never an import path. Any name ``timm.list_models()`` lists works;
the layer a CAM should hook, how that layer lays out its features, the input size, the normalisation, the
classifier name, the first conv and the block grouping ``last_n`` counts are all read from timm's own
model (see :mod:`medlens.models.features`), so they cannot drift from the weights. The registry holds only
what medlens adds: its defaults with a one-line summary for ``medlens models``, names of its own
(``tiny``), input sizes for the tests' models, and the exceptions where a derived value would be wrong.

How many blocks ``last_n`` can count for each registered backbone (the stem first, the last block carrying
the final norm; see :meth:`medlens.models.Classifier.blocks`)::

    resnet50 17, resnetv2_50 17, densenet121 59, efficientnet_b0 17, convnext_tiny 19,
    vit_small_patch16_224 13, resnet18 9, tiny 5, test_* 5-10
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medlens.errors import ConfigError, WeightsUnavailableError
from medlens.models.sources import (
    LOCAL_FILE_HINT,
    hub_model_name,
    hub_reachable,
    in_hub_cache,
    is_weights_file,
    is_xrv,
    use_hub_offline,
)

LAYOUTS = ("nchw", "nhwc", "tokens")
"""How a CAM layer lays out its output: ``(B, C, H, W)``, ``(B, H, W, C)`` (Swin, MambaOut), or
``(B, prefix + H*W, C)`` tokens (ViT, DeiT, EVA, Mixer); ``Classifier.cam_reshape`` maps the last two."""

ANY_TIMM_NAME = (
    "any other name timm.list_models() lists works too (e.g. densenet169, efficientnet_b3, convnext_small, "
    "swin_tiny_patch4_window7_224); hub weights go in model.pretrained, e.g. timm/convnext_small.fb_in22k"
)


@dataclass(frozen=True)
class BackboneSpec:
    """What medlens needs to know about one backbone beyond what timm's model says itself."""

    name: str
    timm_name: str
    summary: str
    cam_layer: str | None = None
    """Dotted path, inside the timm model, of the module whose output a CAM should weigh; ``None``: derived."""
    layout: str | None = None
    """One of :data:`LAYOUTS` for ``cam_layer``'s output; ``None``: derived with it."""
    image_size: int | None = None
    """Default input side; ``None`` takes the weights' (timm's pretrained) input size."""
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.layout is not None and self.layout not in LAYOUTS:
            raise ConfigError(f"backbone {self.name!r}: layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if (self.cam_layer is None) != (self.layout is None):
            raise ConfigError(f"backbone {self.name!r}: give cam_layer and layout together, or neither to derive both")


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Make ``spec`` available to :func:`medlens.models.create_model` under ``spec.name``."""
    if spec.name in _REGISTRY:
        raise ConfigError(f"a backbone called {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[str]:
    """The names medlens registers itself, sorted; :data:`ANY_TIMM_NAME` says what else works."""
    return sorted(_REGISTRY)


def describe_models() -> dict[str, Any]:
    """What ``medlens models`` shows: each registered name with its timm model and summary, and the rest."""
    from medlens.models.xrv import XRV_WEIGHTS, xrv_folder

    return {
        "models": [
            {"name": spec.name, "timm_name": spec.timm_name, "summary": spec.summary}
            for spec in map(get_backbone_spec, list_models())
        ],
        "any_timm_name": ANY_TIMM_NAME,
        "timm_models": len(_timm_index()),
        "torchxrayvision_weights": {
            "names": [f"xrv:{name}" for name in XRV_WEIGHTS],
            "folder": str(xrv_folder()),
        },
    }


def get_backbone_spec(name: str) -> BackboneSpec:
    """The registered spec for ``name``, or a derived one for a timm model name; else a ConfigError."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _timm_index():
        return BackboneSpec(name, name, f"timm's {name}")
    arch, _, tag = name.partition(".")
    if tag and arch in _timm_index():
        raise ConfigError(
            f"model name {name!r} carries a weights tag: set model.name: {arch} and model.pretrained: timm/{name}"
        )
    close = difflib.get_close_matches(name, sorted({*_REGISTRY, *_timm_index()}), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(
        f"unknown model name {name!r}; {hint}medlens names {', '.join(list_models())}, and {ANY_TIMM_NAME}"
    )


def check_model(model_name: str, pretrained: object) -> None:
    """Raise at once for a model name neither medlens nor timm knows, a local weights file that is missing,
    or hub weights out of reach (offline, and not in the hub's local cache); return when they may load."""
    timm_name = get_backbone_spec(model_name).timm_name
    if pretrained is False or pretrained is None or is_xrv(pretrained):
        return
    if is_weights_file(pretrained):
        if not Path(pretrained).expanduser().is_file():
            raise WeightsUnavailableError(f"pretrained weights file {str(pretrained)!r} not found")
        return
    hub_name = None if pretrained is True else str(pretrained)
    model, overlay = hub_model_name(timm_name, hub_name)
    repo = overlay["hf_hub_id"] if overlay else hub_repo(model)
    if repo is None or hub_reachable():
        return
    use_hub_offline()
    if not in_hub_cache(repo):
        source = hub_name or f"timm's default weights for {timm_name} ({repo})"
        raise WeightsUnavailableError(
            f"cannot fetch {source}: the Hugging Face hub is unreachable and its local cache does not hold it. "
            f"Download the weights where there is a network and pass the local file instead: {LOCAL_FILE_HINT}"
        )


def hub_repo(model: str) -> str | None:
    """The hub repo of timm's weights ``arch`` (its default tag) or ``arch.tag``; ``None`` where timm names no
    such weights on the hub (none at all, or a plain URL): then only loading them can tell."""
    arch, _, tag = model.partition(".")
    tags = _timm_index().get(arch, {})
    tag = tag or next(iter(tags), "")
    return tags.get(tag) if tag else None


TIMM_INDEX = Path(__file__).with_name("timm_index.txt")
"""Every ``timm.list_models()`` name with its pretrained tags (the default first) and each tag's hub repo,
written for the timm version on its first line by ``scripts/timm_index.py``. With that version installed,
model names are checked, and hub weights looked for in the cache, without importing timm and torch (seconds
on a laptop); with another, timm itself is asked. ``tests/models/test_timm_index.py`` keeps it true."""


@functools.cache
def _timm_index() -> dict[str, dict[str, str | None]]:
    """arch -> {tag: hub repo or None}, default tag first: from :data:`TIMM_INDEX` if it fits, else timm."""
    shipped = read_timm_index(TIMM_INDEX)
    return shipped if shipped is not None else build_timm_index()


def build_timm_index() -> dict[str, dict[str, str | None]]:
    """What the installed timm says: each model name, its pretrained tags (default first), each tag's repo."""
    import timm
    from timm.models import get_pretrained_cfg

    index: dict[str, dict[str, str | None]] = {name: {} for name in timm.list_models()}
    for name in timm.list_models(pretrained=True):
        arch, _, tag = name.partition(".")
        index[arch][tag] = get_pretrained_cfg(name).hf_hub_id or None
    for arch, tags in index.items():
        default = get_pretrained_cfg(arch).tag if tags else None
        if default in tags:
            index[arch] = {default: tags[default]} | tags
    return index


def read_timm_index(path: Path) -> dict[str, dict[str, str | None]] | None:
    """The index in ``path``, or ``None`` when it is missing or was written for another timm than installed.

    A line is ``arch<TAB>tag tag=org/repo tag=``: a bare tag's repo is ``timm/arch.tag``, ``tag=`` has none."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        installed = importlib.metadata.version("timm")
    except (OSError, importlib.metadata.PackageNotFoundError):
        return None
    if not lines or lines[0] != f"{INDEX_HEADER} {installed}":
        return None
    index: dict[str, dict[str, str | None]] = {}
    for line in lines[1:]:
        arch, _, tags = line.partition("\t")
        index[arch] = {}
        for item in tags.split():
            tag, marked, repo = item.partition("=")
            index[arch][tag] = (repo or None) if marked else f"timm/{arch}.{tag}"
    return index


def format_timm_index(index: dict[str, dict[str, str | None]], version: str) -> str:
    """:func:`read_timm_index`'s text for ``index``, as written for timm ``version``."""
    lines = [f"{INDEX_HEADER} {version}"]
    for arch in sorted(index):
        items = [tag if repo == f"timm/{arch}.{tag}" else f"{tag}={repo or ''}" for tag, repo in index[arch].items()]
        lines.append(f"{arch}\t{' '.join(items)}")
    return "\n".join(lines) + "\n"


INDEX_HEADER = "# timm"


for _spec in (
    BackboneSpec("resnet50", "resnet50", "ResNet-50, the default X-ray backbone"),
    BackboneSpec("resnetv2_50", "resnetv2_50", "pre-activation ResNet-50 (BiT family)"),
    BackboneSpec("densenet121", "densenet121", "DenseNet-121, as in CheXNet and torchxrayvision"),
    BackboneSpec("efficientnet_b0", "efficientnet_b0", "EfficientNet-B0, small and strong"),
    BackboneSpec("convnext_tiny", "convnext_tiny", "ConvNeXt-T"),
    BackboneSpec("vit_small_patch16_224", "vit_small_patch16_224", "ViT-S/16, any input side a multiple of 16"),
    BackboneSpec("resnet18", "resnet18", "ResNet-18, a quick baseline"),
    # Output stride 16 (a dilated last stage) gives an 8x8 CAM grid at 128 px instead of 4x4: the demo's
    # heatmaps must be able to point inside a nodule-sized box.
    BackboneSpec(
        "tiny", "resnet10t", "ResNet-10-T at 128 px with output stride 16, the demo's CPU CNN",
        image_size=128, timm_kwargs={"output_stride": 16},
    ),
    BackboneSpec("test_resnet", "test_resnet", "timm's test ResNet, for tests", image_size=64),
    BackboneSpec("test_efficientnet", "test_efficientnet", "timm's test EfficientNet", image_size=64),
    BackboneSpec("test_convnext", "test_convnext", "timm's test ConvNeXt", image_size=64),
    BackboneSpec("test_vit", "test_vit", "timm's test ViT", image_size=64),
    # timm has no test DenseNet or Swin: these are the real architectures, narrowed and shortened.
    BackboneSpec(
        "test_densenet", "densenet121", "DenseNet-121 cut to one layer per block and growth 8, for tests",
        image_size=64, timm_kwargs={"growth_rate": 8, "block_config": (1, 1, 1, 1)},
    ),
    BackboneSpec(
        "test_swin", "swin_tiny_patch4_window7_224", "Swin-T cut to one block per stage and 16 channels, for tests",
        image_size=64, timm_kwargs={"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)},
    ),
):
    register_backbone(_spec)
