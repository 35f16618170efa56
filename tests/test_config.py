"""Configs: YAML read safely, dotted overrides, unknown keys and bad choices named."""

from __future__ import annotations

import pytest

from medlens.config import load_config
from medlens.configs import shipped_configs
from medlens.errors import ConfigError

CONFIGS = list(shipped_configs().values())


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: densenet121\ntrain:\n  lr: 0.001\n")
    config = load_config(path, ["train.lr=1e-3", "train.epochs=3", "model.pretrained=false", "data.views=[PA]"])
    assert config.model.name == "densenet121"
    assert config.train.lr == pytest.approx(1e-3) and isinstance(config.train.lr, float)
    assert config.train.epochs == 3 and config.model.pretrained is False
    assert config.data.views == ["PA"]
    assert config.train.optimizer == "sgd" and config.train.momentum == 0.9  # the seeds' default
    again = load_config(None, [f"{k}={v}" for k, v in [("model.pretrained", "/w/r50.safetensors")]])
    assert again.model.pretrained == "/w/r50.safetensors"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["train.lrr=1"], r"unknown config key 'train.lrr'.*valid keys: .*train.lr"),
        (["optim.lr=1"], r"unknown config key 'optim'"),
        (
            ["model.strategy=partial"],
            r"model.strategy='partial' is not valid; choose one of: head, full, last_n",
        ),
        (["train.epochs=many"], r"train.epochs must be int"),
        (["train.lr"], r"not key=value"),
    ],
)
def test_bad_keys_and_values_are_named(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "value",
    [
        "!!python/object/apply:os.system ['touch {marker}']",
        "!!python/object/apply:pathlib.Path.write_text [!!python/object/apply:pathlib.Path ['{marker}'], 'x']",
        "!!python/object/new:pathlib.Path ['{marker}']",
        "!!python/name:os.system",
        "!!python/module:os",
    ],
    ids=["system", "apply", "new", "name", "module"],
)
def test_yaml_is_parsed_safely(tmp_path, value):
    path = tmp_path / "evil.yaml"
    marker = tmp_path / "pwned"
    path.write_text(f"data: {value.format(marker=marker)}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("trian:\n  epochs: 3\n", r"unknown config key 'trian' \(top level\); valid keys: data, model, faces, train"),
        ("model:\n  nmae: resnet50\n", r"unknown config key 'model\.nmae' \(model\); valid keys: model\.name, "),
        (
            "data:\n  phantoms:\n    count: 3\n",
            r"unknown config key 'data\.phantoms\.count' \(data\.phantoms\); valid keys: data\.phantoms\.n, "
            r"data\.phantoms\.task, data\.phantoms\.size, data\.phantoms\.seed",
        ),
    ],
    ids=["section", "key", "nested"],
)
def test_unknown_keys_in_a_file_are_named_with_the_valid_ones(tmp_path, text, match):
    path = tmp_path / "typo.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_ready_configs_load(path):
    config = load_config(path)
    assert config.to_yaml()
    assert load_config(None, [])  # defaults alone are valid too
