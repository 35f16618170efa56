"""The shipped configs: found by name from any folder, listed with their purpose, printed to copy."""

from __future__ import annotations

from pathlib import Path

import pytest

from medlens.cli import main
from medlens.configs import FOLDER, find_config, purpose, shipped_configs
from medlens.errors import ConfigError

NAMES = {"cxr4", "cxr4-scratch", "demo", "nih14", "nih14-densenet121", "nih14-scratch", "syndromes12",
         "syndromes12-dlib", "syndromes12-scratch"}  # fmt: skip


def test_every_config_ships_with_a_one_line_purpose():
    shipped = shipped_configs()
    assert set(shipped) == NAMES
    for path in shipped.values():
        assert path.parent == FOLDER and 20 < len(purpose(path)) <= 110, path


def test_a_name_finds_the_shipped_file_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_config("cxr4") == find_config("cxr4.yaml") == FOLDER / "cxr4.yaml"
    (tmp_path / "cxr4.yaml").write_text("train: {epochs: 1}\n")
    assert find_config("cxr4.yaml").resolve() == tmp_path / "cxr4.yaml"  # an existing file wins
    (tmp_path / "nih14").mkdir()
    assert find_config("nih14") == FOLDER / "nih14.yaml" and find_config("/dev/null") == Path("/dev/null")
    with pytest.raises(ConfigError, match="shipped configs: cxr4, cxr4-scratch, demo, nih14, "):
        find_config("configs/nih14.yaml")


def test_configs_lists_them_and_prints_one(capsys):
    assert main(["configs"]) == 0
    listing = capsys.readouterr().out
    for name in NAMES:
        assert any(line.startswith(f"{name} ") for line in listing.splitlines()), name
    assert main(["configs", "demo"]) == 0
    assert capsys.readouterr().out == (FOLDER / "demo.yaml").read_text()


def test_data_sets_the_source_as_written(tmp_path, capsys):
    # A colon and a hash would make YAML read --set data.source=... as a mapping and a comment.
    source = tmp_path / "no such: folder #1"
    assert main(["train", "demo", "--data", str(source), "--out", str(tmp_path / "run")]) == 1
    assert f"data source {str(source)!r} does not exist" in capsys.readouterr().err
