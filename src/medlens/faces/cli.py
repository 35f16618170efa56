"""``medlens faces ...``: train a head on face embeddings, predict, explain, and fill the embedding cache.

``add_parser(jobs)`` adds the ``faces`` sub-command to the main parser's sub-parsers; handlers print,
the library logs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medlens.faces.detect import DETECTORS, DetectorSettings, NoFaceError


def add_parser(jobs: argparse._SubParsersAction) -> None:
    faces = jobs.add_parser("faces", help="classify faces with dlib embeddings and a light head (SVM, ...)")
    sub = faces.add_subparsers(title="face jobs", metavar="FACE_JOB", required=True)

    train = sub.add_parser("train", help="embed a folder per class, split by patient, fit and evaluate a head")
    train.add_argument("source", help="folder of class folders (or a CSV with path, label, patient_id)")
    train.add_argument("--out", required=True, type=Path, help="run folder: best/, metrics.json, predictions.csv")
    # Checked by create_head, which names the valid heads: importing them here would load torch for --help.
    train.add_argument("--head", default="svm", help="svm (default), logistic or mlp")
    train.add_argument("--cache", type=Path, help="embedding cache folder (default OUT/embedding-cache)")
    train.add_argument("--test-fraction", type=float, default=0.2, help="held-out share of photos (default 0.2)")
    train.add_argument("--seed", type=int, default=0, help="split and head seed")
    _detector_args(train)
    train.set_defaults(handler=_train)

    predict = sub.add_parser("predict", help="probabilities of every class for each photo")
    predict.add_argument("checkpoint", type=Path, help="face run folder or checkpoint folder")
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    predict.add_argument("--top-k", type=int, default=5, help="classes to list per photo (default 5)")
    predict.add_argument("--json", action="store_true", help="one JSON object per photo, with landmarks")
    predict.set_defaults(handler=_predict)

    explain = sub.add_parser("explain", help="occlusion map and landmarks on the aligned face, as PNG")
    explain.add_argument("checkpoint", type=Path)
    explain.add_argument("image", type=Path)
    explain.add_argument("--out", required=True, type=Path, help="PNG file to write")
    explain.add_argument("--target", help="class to explain (default: the top class)")
    explain.add_argument("--patch", type=int, default=30, help="occluding patch side in chip pixels (default 30)")
    explain.add_argument("--stride", type=int, default=15, help="patch step in chip pixels (default 15)")
    explain.set_defaults(handler=_explain)

    align = sub.add_parser("align", help="aligned face chips in a folder per class, for the CNN route")
    align.add_argument("source", help="folder of class folders (or a CSV with path, label, patient_id)")
    align.add_argument("--out", required=True, type=Path, help="folder for <class>/<photo>.png + metadata.csv")
    _detector_args(align)
    align.set_defaults(handler=_align)

    embed = sub.add_parser("embed", help="compute and cache the embedding of every photo of a source")
    embed.add_argument("source", help="folder of class folders (or a CSV)")
    embed.add_argument("--cache", required=True, type=Path, help="embedding cache folder")
    _detector_args(embed)
    embed.set_defaults(handler=_embed)


def _detector_args(parser: argparse.ArgumentParser) -> None:
    defaults = DetectorSettings()
    parser.add_argument("--detector", choices=DETECTORS, default=defaults.detector, help="face detector")
    parser.add_argument("--upsample", type=int, default=defaults.upsample, help="upsampling steps (0-3)")


def _settings(args: argparse.Namespace) -> DetectorSettings:
    return DetectorSettings(detector=args.detector, upsample=args.upsample)


def _train(args: argparse.Namespace) -> int:
    from medlens.faces.pipeline import train_face_head

    result = train_face_head(
        args.source,
        args.out,
        args.head,
        head_params={"seed": args.seed},
        settings=_settings(args),
        cache_dir=args.cache,
        test_fraction=args.test_fraction,
        seed=args.seed,
    )
    metrics = result.metrics["metrics"]
    ranks = " ".join(f"{k} {v:.3f}" for k, v in metrics["top_k"].items() if v is not None)
    print(f"{args.head}: accuracy {metrics['accuracy']:.3f} {ranks} on {result.metrics['n_test']} held-out photos")
    print(f"{result.metrics['n_no_face']} photos without a face; checkpoint {result.checkpoint}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from medlens.faces.pipeline import FacePredictor

    predictor = FacePredictor.from_checkpoint(args.checkpoint)
    failed = 0
    for image in args.images:
        try:
            found = predictor.predict_image(image, k=args.top_k)
        except NoFaceError as exc:
            print(f"medlens: {exc}", file=sys.stderr)
            failed += 1
            continue
        if args.json:
            print(json.dumps({"image": str(image), **found.to_dict()}))
        else:
            ranked = ", ".join(f"{label} {p:.3f}" for label, p in found.top_k)
            print(f"{image}: {ranked} ({found.n_faces} face{'s' if found.n_faces > 1 else ''})")
    return 1 if failed else 0


def _align(args: argparse.Namespace) -> int:
    from medlens.faces.pipeline import align_faces

    written, no_face = align_faces(args.source, args.out, _settings(args))
    print(f"wrote {written} aligned chips to {args.out} ({len(no_face)} photos without a face)")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from medlens.faces.pipeline import FacePredictor

    predictor = FacePredictor.from_checkpoint(args.checkpoint)
    predictor.explain(args.image, args.out, target=args.target, patch_size=args.patch, stride=args.stride)
    print(f"wrote {args.out}")
    return 0


def _embed(args: argparse.Namespace) -> int:
    from medlens.data.records import load_source
    from medlens.faces.embed import embed_paths

    table = load_source(args.source)
    batch = embed_paths(table.paths, _settings(args), cache_dir=args.cache)
    print(
        f"{len(batch.paths)} photos, {int(batch.from_cache.sum())} already cached, {len(batch.no_face)} without a face"
    )
    if batch.ms_per_image:
        print("ms per photo: " + ", ".join(f"{step} {ms:.1f}" for step, ms in batch.ms_per_image.items()))
    print(f"cache: {args.cache}")
    return 0
