"""Every sub-command's help is plain text and ends with an example that still parses."""

from __future__ import annotations

import shlex

import pytest

from medlens.cli import build_parser
from medlens.cli_examples import EXAMPLES, walk

COMMANDS = list(walk(build_parser()))


def test_every_example_names_a_command():
    assert set(EXAMPLES) == {path for path, _ in COMMANDS}


@pytest.mark.parametrize(("path", "parser"), COMMANDS, ids=[path or "medlens" for path, _ in COMMANDS])
def test_help_is_plain_text_with_an_example(path, parser):
    text = parser.format_help()
    assert "``" not in text and ":func:" not in text and ":mod:" not in text, text
    example = EXAMPLES[path]
    assert f"example:\n  {example}\n" in text + "\n"
    words = shlex.split(example)
    assert words[0] == "medlens" and words[1 : 1 + len(path.split())] == path.split()
    build_parser().parse_args(words[1:])  # argparse exits (a test failure) on a stale option
