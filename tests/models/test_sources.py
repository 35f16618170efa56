"""Model names and weights sources are checked without the model stack, from an index that cannot drift."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest
from huggingface_hub import constants as hub_constants

import medlens.models
from medlens.errors import ConfigError, WeightsUnavailableError
from medlens.models import registry, sources
from medlens.models.registry import TIMM_INDEX, build_timm_index, format_timm_index, hub_repo, read_timm_index


def test_the_shipped_index_is_what_the_installed_timm_says():
    version = importlib.metadata.version("timm")
    expected = format_timm_index(build_timm_index(), version)
    assert TIMM_INDEX.read_text(encoding="utf-8") == expected, "run scripts/timm_index.py after changing timm's pin"
    assert read_timm_index(TIMM_INDEX) == build_timm_index()


def test_an_index_for_another_timm_is_not_trusted(tmp_path):
    other = tmp_path / "index.txt"
    other.write_text("# timm 0.0.1\nresnet50\ta1_in1k\n")
    assert read_timm_index(other) is None


def test_hub_repos_follow_timm_tags_and_their_exceptions():
    assert hub_repo("resnet50") == "timm/resnet50.a1_in1k"  # the default tag
    assert hub_repo("resnet50.tv_in1k") == "timm/resnet50.tv_in1k"
    assert hub_repo("cspnext_l.rsb_a1_in1k") == "munehiro-k/cspnext_l.rsb_a1_in1k"
    assert hub_repo("gcvit_tiny") is None  # a URL, not the hub: only loading can tell
    assert hub_repo("resnet50.no_such_tag") is None


def test_the_check_imports_neither_torch_nor_timm():
    code = (
        "import sys\n"
        "from medlens.models.registry import check_model\n"
        "try:\n"
        "    check_model('resnet5000', False)\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, 'resnet50,' in str(exc))\n"
        "print('torch' in sys.modules, 'timm' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["ConfigError", "True", "False", "False"], done.stderr


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_missing_names_and_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="resnet5000"):
        registry.check_model("resnet5000", False)
    with pytest.raises(WeightsUnavailableError, match=r"w\.safetensors' not found"):
        registry.check_model("resnet18", str(tmp_path / "w.safetensors"))
    (tmp_path / "w.safetensors").write_bytes(b"")
    registry.check_model("resnet18", str(tmp_path / "w.safetensors"))  # reading it is the loader's job


@pytest.mark.parametrize(
    ("pretrained", "repo"), [(True, "timm/resnet18.a1_in1k"), ("timm/resnet18.tv_in1k", None), ("org/x", None)]
)
def test_hub_weights_offline_load_only_from_the_cache(offline_hub, pretrained, repo):
    with pytest.raises(WeightsUnavailableError, match=sources.LOCAL_FILE_HINT) as caught:
        registry.check_model("resnet18", pretrained)
    assert (repo or pretrained) in str(caught.value)
    folder = (repo or pretrained).replace("/", "--")
    (offline_hub / f"models--{folder}" / "snapshots" / "abc123").mkdir(parents=True)
    registry.check_model("resnet18", pretrained)


def test_what_only_loading_can_tell_is_left_to_it(offline_hub, monkeypatch):
    registry.check_model("gcvit_tiny", True)  # URL weights: torch's cache, not the hub's
    registry.check_model("resnet18", "xrv:densenet121-res224-all")
    monkeypatch.setattr(registry, "hub_reachable", lambda: True)
    registry.check_model("resnet18", True)


def test_the_models_package_names_resolve_lazily():
    assert sorted(medlens.models.__all__) == sorted(medlens.models._HOME)
    for name in medlens.models.__all__:
        assert getattr(medlens.models, name) is not None
    with pytest.raises(AttributeError, match="no_such_thing"):
        medlens.models.no_such_thing  # noqa: B018
