"""One example under each sub-command's ``--help``; help text is printed as written, in plain text.

Examples are kept here, by command path, so that every sub-command has one; ``tests/test_cli_help.py`` walks
the parser and parses each example, so a renamed option cannot leave a stale one behind.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

EXAMPLES = {
    "": "medlens train cxr4 --data ../shared/data/cxr4 --out runs/cxr4",
    "configs": "medlens configs",
    "models": "medlens models --json",
    "data": "medlens data inspect ../shared/data/nih14",
    "data inspect": "medlens data inspect ../shared/data/nih14 --json",
    "data phantoms": "medlens data phantoms --out runs/phantoms --n 400 --task multiclass --marker",
    "data cache": "medlens data cache ../shared/data/nih14 --size 256 --out runs/cache-nih14",
    "train": "medlens train cxr4 --data ../shared/data/cxr4 --out runs/cxr4 --set train.epochs=5",
    "evaluate": "medlens evaluate runs/cxr4 --data ../shared/data/cxr4 --out runs/cxr4/eval",
    "audit": "medlens audit runs/cxr4 --data ../shared/data/cxr4 --out runs/cxr4/audit",
    "predict": "medlens predict runs/cxr4 images/ --out predictions.csv",
    "export": "medlens export runs/cxr4 --format onnx --images images/",
    "explain": "medlens explain runs/nih14 film.png --out heatmaps --method gradcam",
    "serve": "medlens serve runs/demo/run --port 8000",
    "demo": "medlens demo --out runs/demo",
    "tune": "medlens tune cxr4 --data ../shared/data/cxr4 --trials 30 --folds 5 --out runs/tune",
    "faces": "medlens faces train photos/ --out runs/faces --head svm",
    "faces train": "medlens faces train photos/ --out runs/faces --head svm",
    "faces predict": "medlens faces predict runs/faces photo.jpg --top-k 3",
    "faces explain": "medlens faces explain runs/faces photo.jpg --out occlusion.png",
    "faces align": "medlens faces align photos/ --out data/syndromes12",
    "faces embed": "medlens faces embed photos/ --cache runs/embedding-cache",
}
"""An example command line for each sub-command, by its path ("" for medlens itself)."""

TOP_LEVEL_NOTE = (
    "Each job's --help shows an example; medlens configs lists the ready configs.\n"
    "Optional jobs come as extras: pip install 'medlens[serve]' (or faces, onnx, tune, fast-png, all)."
)


def add_examples(parser: argparse.ArgumentParser) -> None:
    """Show each parser's example below its options, and print descriptions and examples as written."""
    for path, command in walk(parser):
        command.formatter_class = argparse.RawDescriptionHelpFormatter
        example = EXAMPLES.get(path)
        if example is not None:
            command.epilog = f"example:\n  {example}" + (f"\n\n{TOP_LEVEL_NOTE}" if path == "" else "")


def walk(parser: argparse.ArgumentParser, path: str = "") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """``parser`` and every sub-command parser below it, each with its path ("data inspect")."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                yield from walk(command, f"{path} {name}".strip())
