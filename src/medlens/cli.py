"""The ``medlens`` command: one entry point, one sub-command per job."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from medlens import __version__
from medlens.errors import MedlensError

log = logging.getLogger("medlens")

Handler = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except MedlensError as exc:
        print(f"medlens: error: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medlens", description=__doc__)
    parser.add_argument("--version", action="version", version=f"medlens {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    jobs = parser.add_subparsers(title="jobs", metavar="JOB")
    _add_data(jobs)
    _add_demo(jobs)
    return parser


def _source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="folder of class folders, folder with an NIH CSV, or a CSV file")
    parser.add_argument("--format", choices=["folder", "nih", "csv"], help="source kind (default: detected)")


def _add_data(jobs: argparse._SubParsersAction) -> None:
    data = jobs.add_parser("data", help="inspect data, generate phantoms, build the preprocessing cache")
    sub = data.add_subparsers(title="data jobs", metavar="DATA_JOB", required=True)

    inspect = sub.add_parser("inspect", help="counts per label, patients, views, missing/unreadable files")
    _source_args(inspect)
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.add_argument("--decode", action="store_true", help="fully decode every image (slow)")
    inspect.set_defaults(handler=_data_inspect)

    phantoms = sub.add_parser("phantoms", help="generate the synthetic chest-X-ray phantom set")
    phantoms.add_argument("--out", required=True, type=Path)
    phantoms.add_argument("--n", type=int, default=400, help="number of images (default 400)")
    phantoms.add_argument("--task", choices=["multiclass", "multilabel"], default="multilabel")
    phantoms.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    phantoms.add_argument("--seed", type=int, default=0)
    phantoms.set_defaults(handler=_data_phantoms)

    cache = sub.add_parser("cache", help="decode and resize every image once into a memory-mapped cache")
    _source_args(cache)
    cache.add_argument("--out", required=True, type=Path)
    cache.add_argument("--size", type=int, default=256, help="side of the cached images (default 256)")
    cache.add_argument("--channels", type=int, choices=[1, 3], default=1)
    cache.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    cache.set_defaults(handler=_data_cache)


def _data_inspect(args: argparse.Namespace) -> int:
    from medlens.data.inspect import format_summary, summarize
    from medlens.data.records import load_source

    table = load_source(args.source, args.format)
    summary = summarize(table, decode=args.decode, progress=not args.json)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def _data_phantoms(args: argparse.Namespace) -> int:
    from medlens.data.phantoms import generate_phantoms

    out = generate_phantoms(args.out, n=args.n, task=args.task, size=args.size, seed=args.seed)
    print(f"wrote {args.n} {args.task} phantoms to {out}")
    return 0


def _data_cache(args: argparse.Namespace) -> int:
    from medlens.data.cache import build_cache
    from medlens.data.records import load_source

    table = load_source(args.source, args.format)
    cache = build_cache(table.paths, args.out, size=args.size, channels=args.channels, workers=args.workers)
    unreadable = int((cache.status != "ok").sum())
    print(f"cached {len(cache)} images at {cache.size}px in {args.out} ({unreadable} unreadable)")
    return 0


def _add_demo(jobs: argparse._SubParsersAction) -> None:
    demo = jobs.add_parser("demo", help="the main job on the embedded phantoms (needs nothing downloaded)")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    demo.add_argument("--n", type=int, default=400, help="number of phantom images (default 400)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from medlens.data.inspect import format_summary, summarize
    from medlens.data.phantoms import generate_phantoms
    from medlens.data.records import load_source

    data = generate_phantoms(args.out / "phantoms", n=args.n, task="multilabel", seed=args.seed)
    print(format_summary(summarize(load_source(data))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
