"""The ``medlens explain`` sub-command; ``medlens.cli`` adds it with :func:`add_parser`."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(jobs: argparse._SubParsersAction) -> argparse.ArgumentParser:
    explain = jobs.add_parser("explain", help="CAM heatmaps over images, an HTML index, scores against boxes")
    explain.add_argument("checkpoint", type=Path, help="run folder or checkpoint folder")
    explain.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files or folders of images")
    explain.add_argument("--out", required=True, type=Path, help="folder for overlays, maps and index.html")
    explain.add_argument(
        "--method",
        default="gradcam",
        help="CAM method: gradcam (default), gradcam++, hirescam, layercam, eigencam or scorecam",
    )
    explain.add_argument(
        "--label",
        dest="labels",
        action="append",
        metavar="L",
        help="explain this label on every image (repeatable; default: the positive findings, or the class)",
    )
    explain.add_argument(
        "--boxes", type=Path, metavar="BBOX_CSV", help="NIH BBox_List_2017.csv: explain boxed findings and score them"
    )
    explain.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        metavar="PX",
        help="pointing game: a hit within PX original pixels of a box counts (Zhang et al. use 15; default 0)",
    )
    explain.set_defaults(handler=_explain)
    return explain


def _explain(args: argparse.Namespace) -> int:
    from medlens.explain.run import explain_images

    result = explain_images(
        args.checkpoint, args.images, args.out, args.method, args.labels, args.boxes, args.tolerance
    )
    print(f"{result['n_maps']} {args.method} maps of {result['n_images']} images in {args.out}")
    if result["scores"] is not None:
        print(f"{'finding':<24}{'n':>4}{'pointing':>10}{'energy':>9}")
        for finding, row in result["scores"].items():
            print(f"{finding:<24}{row['n']:>4}{row['pointing']:>10.2f}{row['energy']:>9.2f}")
        print(f"scores: {args.out / 'scores.json'}")
    print(f"open {result['index']}")
    return 0
