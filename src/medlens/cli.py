"""medlens: explained, measured predictions from medical images, one sub-command per job.

Train transfer-learning classifiers for chest X-rays and face photos, evaluate them, explain them with
heatmaps and serve them. Research software: not for diagnosis.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medlens import __version__
from medlens.cli_examples import add_examples
from medlens.errors import MedlensError

if TYPE_CHECKING:
    from medlens.config import Config

log = logging.getLogger("medlens")

Handler = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one job; 0 when it succeeded, 1 with a one-line error for anything a user can cause (a traceback
    too with ``-v``), 2 for a command line argparse cannot read."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # medlens says what it does; other libraries (the ONNX exporter's optimiser passes, ...) only warn, unless -v.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not args.verbose:
        log.setLevel(logging.INFO)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    from medlens.runtime import apply_cpu_defaults

    apply_cpu_defaults()  # before any job imports torch: the OpenMP wait policy is read when it loads
    try:
        return handler(args)
    except MedlensError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"medlens: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("medlens: interrupted; a run continues with --resume", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medlens", description=__doc__)
    parser.add_argument("--version", action="version", version=f"medlens {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    jobs = parser.add_subparsers(title="jobs", metavar="JOB")
    _add_data(jobs)
    _add_models(jobs)
    _add_train(jobs)
    _add_evaluate(jobs)
    _add_audit(jobs)
    _add_predict(jobs)
    _add_export(jobs)
    _add_explain(jobs)
    _add_serve(jobs)
    _add_demo(jobs)
    _add_tune(jobs)
    _add_faces(jobs)
    _add_configs(jobs)
    add_examples(parser)
    return parser


def _device_arg(parser: argparse.ArgumentParser, config_key: str | None = None) -> None:
    where = f" (default: {config_key} of the config, auto)" if config_key else " (default auto)"
    parser.add_argument(
        "--device",
        help=f"auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps{where}",
        default=None if config_key else "auto",
    )


def _with_device(args: argparse.Namespace) -> list[str]:
    """The ``--set`` and ``--data`` overrides, with ``--device`` as ``train.device`` where it was given."""
    return [*_overrides(args), *([f"train.device={args.device}"] if args.device else [])]


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
    phantoms.add_argument(
        "--marker",
        action="store_true",
        help="a set made to cheat (needs --task multiclass): each class from its own site, stamped in a corner",
    )
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

    out = generate_phantoms(args.out, n=args.n, task=args.task, size=args.size, seed=args.seed, marker=args.marker)
    print(f"wrote {args.n} {args.task} phantoms{' stamped with their site' if args.marker else ''} to {out}")
    return 0


def _data_cache(args: argparse.Namespace) -> int:
    from medlens.data.cache import build_cache
    from medlens.data.records import load_source

    table = load_source(args.source, args.format)
    cache = build_cache(table.paths, args.out, size=args.size, channels=args.channels, workers=args.workers)
    unreadable = int((cache.status != "ok").sum())
    print(f"cached {len(cache)} images at {cache.size}px in {args.out} ({unreadable} unreadable)")
    return 0


def _add_models(jobs: argparse._SubParsersAction) -> None:
    models = jobs.add_parser("models", help="the backbones medlens names, and which other names work")
    models.add_argument("--json", action="store_true", help="print one JSON object")
    models.set_defaults(handler=_models)


def _models(args: argparse.Namespace) -> int:
    from medlens.models import describe_models

    described = describe_models()
    if args.json:
        print(json.dumps(described, indent=2))
        return 0
    width = max(len(model["name"]) for model in described["models"])
    for model in described["models"]:
        print(f"{model['name']:<{width}}  {model['summary']}")
    print(f"\n{described['any_timm_name']}")
    xrv = described["torchxrayvision_weights"]
    print(f"torchxrayvision weights, read from {xrv['folder']}: {', '.join(xrv['names'])}")
    return 0


def _add_train(jobs: argparse._SubParsersAction) -> None:
    train = jobs.add_parser("train", help="train a classifier from a config: a shipped name or a YAML (torchrun: DDP)")
    train.add_argument("config", help="a shipped config's name (medlens configs lists them) or a YAML file")
    train.add_argument("--out", required=True, type=Path, help="run folder: best/, last/, history.csv")
    _override_args(train)
    train.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last")
    _device_arg(train, "train.device")
    train.add_argument(
        "--folds",
        type=int,
        metavar="K",
        help="patient-grouped K-fold cross-validation: RUN_DIR/fold{i}/, cv_metrics.json and the ensemble/",
    )
    train.set_defaults(handler=_train)


def _checked_config(args: argparse.Namespace) -> Config:
    """A training job's config, with the mistakes that need no model stack answered before torch is imported
    (a second, where the import alone takes several): keys and values, then the model name and weights."""
    from medlens.config import load_config
    from medlens.configs import find_config
    from medlens.models.registry import check_model

    config = load_config(find_config(args.config), _with_device(args))
    if config.model.strategy != "probe":
        check_model(config.model.name, config.model.pretrained)
    return config


def _train(args: argparse.Namespace) -> int:
    config = _checked_config(args)
    from medlens.jobs.train import train

    if args.folds:
        from medlens.jobs.cv import ENSEMBLE_DIR, cross_validate, format_cv

        print(format_cv(cross_validate(config, args.out, args.folds, resume=args.resume)))
        print(f"ensemble checkpoint: {args.out / ENSEMBLE_DIR}")
        return 0
    best = train(config, args.out, resume=args.resume)
    probe = config.model.strategy == "probe"
    heading = "validation: " if probe else f"best epoch {best.pop('epoch', '?')}: "
    print(heading + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in best.items()))
    print(f"checkpoint: {args.out / 'best'}")
    return 0


def _override_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", metavar="SOURCE", help="the data SOURCE to use: short for --set data.source=SOURCE")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=2 (repeatable)",
    )


def _overrides(args: argparse.Namespace) -> list[str]:
    """The --set overrides, then --data as data.source (JSON-quoted, so that YAML reads any path as a string)."""
    return [*args.overrides, f"data.source={json.dumps(args.data)}"] if args.data else args.overrides


def _scored_images_args(parser: argparse.ArgumentParser, out_help: str) -> None:
    """What evaluate and audit share: the run, the images it is scored on, the output folder, the bootstrap."""
    parser.add_argument("checkpoint", type=Path, help="run folder or checkpoint folder")
    parser.add_argument(
        "--data",
        dest="source",
        help="data SOURCE (default: what the run trained on); another source is scored whole, "
        "the run's own data only on its test split",
    )
    parser.add_argument("--out", required=True, type=Path, help=out_help)
    parser.add_argument("--split", help="the run's own split to use when SOURCE is its data (default test)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of patients")


def _add_evaluate(jobs: argparse._SubParsersAction) -> None:
    evaluate = jobs.add_parser(
        "evaluate", help="metrics with CIs and the HTML report: predictions.csv, metrics.json, report.html"
    )
    _scored_images_args(evaluate, "folder for predictions, metrics and report")
    _device_arg(evaluate)
    evaluate.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from medlens.jobs.evaluate import evaluate, format_metrics

    result = evaluate(
        args.checkpoint, args.out, args.source, args.split, n_resamples=args.resamples, device=args.device
    )
    print(f"evaluated {result.metrics['evaluated_on']['description']}")
    print(format_metrics(result.metrics))
    if result.metrics["n_left_out"]:
        print(f"{result.metrics['n_left_out']} images left out: {result.metrics['left_out_because']}")
    print(f"wrote {args.out / 'predictions.csv'} and {args.out / 'metrics.json'}")
    print(f"report: {result.report}")
    return 0


def _add_audit(jobs: argparse._SubParsersAction) -> None:
    audit = jobs.add_parser(
        "audit", help="does the model score by recognising the source? audit.json and audit.html, a verdict per check"
    )
    _scored_images_args(audit, "folder for audit.json and audit.html")
    audit.add_argument("--masks", type=Path, metavar="DIR", help="lung-field masks, DIR/<image stem>.png")
    audit.add_argument(
        "--lung-boxes", type=Path, metavar="CSV", help="lung-field boxes: a CSV with image,x,y,w,h in pixels"
    )
    audit.add_argument("--cam-images", type=int, default=16, help="images whose heatmaps are measured (default 16)")
    audit.add_argument(
        "--cover-images", type=int, default=48, help="images whose border and text are covered (default 48)"
    )
    audit.add_argument("--method", help="heatmap method (default: the model's first, gradcam for networks)")
    _device_arg(audit)
    audit.set_defaults(handler=_audit)


def _audit(args: argparse.Namespace) -> int:
    from medlens.jobs.audit import audit

    result = audit(
        args.checkpoint, args.out, args.source, args.split, masks=args.masks, lung_boxes=args.lung_boxes,
        n_resamples=args.resamples, cam_images=args.cam_images, cover_images=args.cover_images, method=args.method,
        device=args.device,
    )  # fmt: skip
    print(f"audited {result.numbers['evaluated_on']['description']}")
    for verdict in result.numbers["verdicts"]:
        print(f"{verdict['check']:<9} {verdict['line']}")
    print(f"wrote {result.path}")
    print(f"report: {result.report}")
    return 0


def _add_explain(jobs: argparse._SubParsersAction) -> None:
    explain = jobs.add_parser("explain", help="heatmaps over images (CAMs; occlusion for probes), scores against boxes")
    explain.add_argument("checkpoint", type=Path, help="run folder or checkpoint folder")
    explain.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files, folders or a data CSV")
    explain.add_argument("--out", required=True, type=Path, help="folder for overlays, maps and index.html")
    explain.add_argument(
        "--method",
        help="gradcam (networks' default), gradcam++, hirescam, layercam, eigencam, scorecam; occlusion (probes)",
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
    _device_arg(explain)
    explain.set_defaults(handler=_explain)


def _explain(args: argparse.Namespace) -> int:
    from medlens.jobs.explain import explain_images

    result = explain_images(
        args.checkpoint, args.images, args.out, args.method, args.labels, args.boxes, args.tolerance,
        device=args.device,
    )  # fmt: skip
    print(f"{result['n_maps']} {result['method']} maps of {result['n_images']} images in {args.out}")
    if result["scores"] is not None:
        print(f"{'finding':<24}{'n':>4}{'pointing':>10}{'energy':>9}")
        for finding, row in result["scores"].items():
            print(f"{finding:<24}{row['n']:>4}{row['pointing']:>10.2f}{row['energy']:>9.2f}")
        print(f"scores: {args.out / 'scores.json'}")
    print(f"open {result['index']}")
    return 0


def _add_serve(jobs: argparse._SubParsersAction) -> None:
    from medlens.serve.cli import add_parser

    add_parser(jobs)


def _add_predict(jobs: argparse._SubParsersAction) -> None:
    predict = jobs.add_parser("predict", help="probabilities for many images into a CSV (resumable)")
    predict.add_argument("checkpoint", type=Path, help="run folder or checkpoint folder")
    predict.add_argument("inputs", nargs="+", metavar="PATH", help="image files, folders, or a data CSV")
    predict.add_argument("--out", type=Path, default=Path("predictions.csv"), help="CSV (default predictions.csv)")
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument(
        "--backend",
        choices=["auto", "torch", "onnxruntime"],
        help="where forward passes run (default: $MEDLENS_BACKEND, else auto: ONNX Runtime if exported and faster)",
    )
    predict.add_argument(
        "--report", type=Path, metavar="DIR", help="also write a study report per image (HTML, PDF) and an index"
    )
    predict.add_argument("--view", help="reports: the view (PA, AP, ...) of images whose DICOM or record names none")
    predict.add_argument(
        "--patient-label", metavar="TEXT", help="reports: a label to print on each (nothing from the files is)"
    )
    predict.add_argument("--no-pdf", action="store_true", help="reports: HTML only, even where Chromium is installed")
    _device_arg(predict)
    predict.set_defaults(handler=_predict)


def _predict(args: argparse.Namespace) -> int:
    from medlens.inference import load_model
    from medlens.jobs.predict import predict_to_csv

    model = load_model(args.checkpoint, backend=args.backend, device=args.device)
    written = predict_to_csv(model, args.inputs, args.out, args.batch_size)
    print(f"wrote {written} row{'' if written == 1 else 's'} to {args.out}")
    if args.report:
        from medlens.jobs.predict import write_study_reports

        index = write_study_reports(
            model, args.inputs, args.report, view=args.view, patient_label=args.patient_label, pdf=not args.no_pdf
        )
        print(f"reports: {index}")
    return 0


def _add_export(jobs: argparse._SubParsersAction) -> None:
    export = jobs.add_parser(
        "export", help="write model.onnx into a checkpoint, parity-checked and timed against torch"
    )
    export.add_argument("checkpoint", type=Path, help="run folder or checkpoint folder")
    export.add_argument("--format", choices=["onnx"], default="onnx")
    export.add_argument(
        "--images", nargs="+", default=[], metavar="PATH", help="real images (files, folders, a data CSV) for parity"
    )
    export.add_argument("--batch-size", type=int, default=32, help="batch the two backends are timed at")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18; at least 17)")
    export.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from medlens.jobs.export import PARITY_TOLERANCE, export_onnx

    r = export_onnx(args.checkpoint, args.images, batch_size=args.batch_size, opset=args.opset)
    print(
        f"wrote {r.path} ({r.exporter} exporter, opset {r.opset}); max |logit difference| {r.parity_max_abs_diff:.1e} "
        f"on {r.parity_images} {r.parity_source} images (allowed {PARITY_TOLERANCE:.0e})"
    )
    print(
        f"batch {r.batch_size}: torch {r.torch_img_s:.1f} img/s, ONNX Runtime {r.onnxruntime_img_s:.1f} img/s; "
        f"predict and serve will use {r.faster}"
    )
    if r.parity_source == "generated":
        print("parity was checked on generated images; pass --images with real ones for the stronger check")
    return 0


def _add_tune(jobs: argparse._SubParsersAction) -> None:
    tune = jobs.add_parser("tune", help="hyperparameter search by cross-validation (Optuna; resumable)")
    tune.add_argument("config", help="config to start from: a shipped config's name or a YAML file")
    tune.add_argument("--out", required=True, type=Path, help="folder: optuna.db, best.yaml, search.png, trials/")
    tune.add_argument("--trials", type=int, default=20, help="total finished trials, counting earlier runs (20)")
    tune.add_argument("--folds", type=int, default=5, help="cross-validation folds per trial (default 5)")
    tune.add_argument("--timeout", type=float, help="seconds after which no new trial starts")
    tune.add_argument("--image-sizes", type=int, nargs="+", default=[128, 224, 320], metavar="PX", help="sizes to try")
    _override_args(tune)
    _device_arg(tune, "train.device")
    tune.set_defaults(handler=_tune)


def _tune(args: argparse.Namespace) -> int:
    config = _checked_config(args)
    from medlens.jobs.tune import BEST_CONFIG_FILE, SearchSpace, tune

    space = SearchSpace(image_sizes=tuple(args.image_sizes))
    study = tune(config, args.out, args.trials, args.folds, timeout=args.timeout, space=space)
    best = study.best_trial
    print(f"best of {len(study.trials)} trials: #{best.number}, pooled out-of-fold macro AUC {best.value:.4f}")
    print(" ".join(f"{k}={v}" for k, v in best.params.items()))
    print(f"config: {args.out / BEST_CONFIG_FILE}")
    return 0


def _add_configs(jobs: argparse._SubParsersAction) -> None:
    configs = jobs.add_parser("configs", help="list the shipped configs and what each is for, or print one")
    configs.add_argument("name", nargs="?", help="print this config's YAML, e.g. to copy and edit it")
    configs.set_defaults(handler=_configs)


def _configs(args: argparse.Namespace) -> int:
    from medlens.configs import FOLDER, find_config, purpose, shipped_configs

    if args.name:
        print(find_config(args.name).read_text(), end="")
        return 0
    shipped = shipped_configs()
    width = max(map(len, shipped))
    for name, path in shipped.items():
        print(f"{name:<{width}}  {purpose(path)}")
    print(f"\nname one where a config is asked (medlens train cxr4 --data DIR --out RUN); files in {FOLDER}")
    return 0


def _add_demo(jobs: argparse._SubParsersAction) -> None:
    demo = jobs.add_parser("demo", help="the main job on the embedded phantoms: train, evaluate, explain")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    demo.add_argument("--config", default="demo", help="a shipped config's name or a YAML file (default demo)")
    demo.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from medlens.jobs.demo import run_demo

    run_demo(args.out, args.config, args.overrides)
    return 0


# ---------------------------------------------------------------------------------------------- faces
# ``medlens faces ...`` is a thin alias: training is ``medlens train`` with a dlib_face probe config, predicting
# and explaining go through the one model contract; align and embed prepare face data.


def _add_faces(jobs: argparse._SubParsersAction) -> None:
    faces = jobs.add_parser("faces", help="face photos: a dlib-embedding probe (train, predict, explain), align, embed")
    sub = faces.add_subparsers(title="face jobs", metavar="FACE_JOB", required=True)

    train = sub.add_parser("train", help="medlens train with a dlib_face probe: embed, split by patient, fit a head")
    train.add_argument("source", help="folder of class folders (or a CSV with path, label, patient_id)")
    train.add_argument("--out", required=True, type=Path, help="run folder: best/, splits.csv, config.yaml")
    train.add_argument("--head", default="svm", help="svm (default), logreg, mlp or knn")
    train.add_argument("--cache", type=Path, help="embedding cache folder (default OUT/embedding-cache)")
    train.add_argument("--test-fraction", type=float, default=0.2, help="held-out share of photos (default 0.2)")
    train.add_argument("--seed", type=int, default=0, help="split and head seed")
    _detector_args(train)
    train.set_defaults(handler=_faces_train)

    predict = sub.add_parser("predict", help="probabilities of every class for each photo")
    predict.add_argument("checkpoint", type=Path, help="face run folder or checkpoint folder")
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    predict.add_argument("--top-k", type=int, default=5, help="classes to list per photo (default 5)")
    predict.add_argument("--json", action="store_true", help="one JSON object per photo, with landmarks")
    predict.set_defaults(handler=_faces_predict)

    explain = sub.add_parser("explain", help="occlusion map and landmarks on the aligned face, as PNG")
    explain.add_argument("checkpoint", type=Path)
    explain.add_argument("image", type=Path)
    explain.add_argument("--out", required=True, type=Path, help="PNG file to write")
    explain.add_argument("--target", help="class to explain (default: the top class)")
    explain.add_argument("--patch", type=int, default=30, help="occluding patch side in chip pixels (default 30)")
    explain.add_argument("--stride", type=int, default=15, help="patch step in chip pixels (default 15)")
    explain.set_defaults(handler=_faces_explain)

    align = sub.add_parser("align", help="aligned face chips in a folder per class, for the CNN route")
    align.add_argument("source", help="folder of class folders (or a CSV with path, label, patient_id)")
    align.add_argument("--out", required=True, type=Path, help="folder for <class>/<photo>.png + metadata.csv")
    _detector_args(align)
    align.set_defaults(handler=_faces_align)

    embed = sub.add_parser("embed", help="compute and cache the embedding of every photo of a source")
    embed.add_argument("source", help="folder of class folders (or a CSV)")
    embed.add_argument("--cache", required=True, type=Path, help="embedding cache folder")
    _detector_args(embed)
    embed.set_defaults(handler=_faces_embed)


def _detector_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--detector", choices=["hog", "cnn"], default="hog", help="face detector (default hog)")
    parser.add_argument("--upsample", type=int, default=1, help="upsampling steps (0-3, default 1)")


def _face_settings(args: argparse.Namespace) -> Any:
    from medlens.config import FacesConfig

    return FacesConfig(detector=args.detector, upsample=args.upsample)


def _faces_train(args: argparse.Namespace) -> int:
    from medlens.config import load_config
    from medlens.jobs.train import train

    overrides = [
        "model.name=dlib_face",
        "model.strategy=probe",
        f"model.probe={args.head}",
        f"data.source={args.source}",
        f"data.test_fraction={args.test_fraction}",
        f"train.seed={args.seed}",
        f"faces.detector={args.detector}",
        f"faces.upsample={args.upsample}",
        *([f"data.cache={args.cache}"] if args.cache else []),
    ]
    scores = train(load_config(None, overrides), args.out)
    print(f"{args.head}: accuracy {scores['val_accuracy']:.3f}, macro AUC {scores['val_auc']:.3f} on validation")
    print(f"checkpoint: {args.out / 'best'}; held-out photos: medlens evaluate {args.out} --out EVAL")
    return 0


def _faces_predict(args: argparse.Namespace) -> int:
    from medlens.inference import load_model

    model = load_model(args.checkpoint)
    failed = 0
    for image in args.images:
        scores = model.logits([model.prepare(model.read(image))])
        if scores.problems[0] is not None:
            print(f"medlens: {image}: {scores.problems[0].summary}", file=sys.stderr)
            failed += 1
            continue
        probs = model.probabilities(scores.values)[0]
        ranked = sorted(zip(model.labels, probs.tolist(), strict=True), key=lambda item: -item[1])[: args.top_k]
        details = scores.details[0]
        if args.json:
            found = {
                "image": str(image),
                "probabilities": dict(zip(model.labels, probs.tolist(), strict=True)),
                "top_k": [{"label": label, "probability": p} for label, p in ranked],
                **{k: v.tolist() if hasattr(v, "tolist") else v for k, v in details.items()},
            }
            print(json.dumps(found))
        else:
            n = details.get("n_faces", 1)
            shown = ", ".join(f"{label} {p:.3f}" for label, p in ranked)
            print(f"{image}: {shown} ({n} face{'s' if n > 1 else ''})")
    return 1 if failed else 0


def _faces_explain(args: argparse.Namespace) -> int:
    from medlens.errors import ConfigError
    from medlens.explain.overlay import heatmap_png
    from medlens.inference import load_model
    from medlens.io import write_atomic

    model = load_model(args.checkpoint)
    if args.target is not None and args.target not in model.labels:
        raise ConfigError(f"unknown class {args.target!r}; this checkpoint's classes: {', '.join(model.labels)}")
    pixels = model.read(args.image)
    probs = model.predict_images([pixels])[0]
    target = model.labels.index(args.target) if args.target else int(probs.argmax())
    maps = model.heatmaps(pixels, [target], "occlusion", patch_size=args.patch, stride=args.stride)  # type: ignore[call-arg]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, heatmap_png(maps[0].map, maps[0].backdrop, maps[0].marks))
    print(f"wrote {args.out}")
    return 0


def _faces_align(args: argparse.Namespace) -> int:
    from medlens.faces.align import align_faces

    written, no_face = align_faces(args.source, args.out, _face_settings(args))
    print(f"wrote {written} aligned chips to {args.out} ({len(no_face)} photos without a face)")
    return 0


def _faces_embed(args: argparse.Namespace) -> int:
    from medlens.data.records import load_source
    from medlens.faces.embed import embed_paths

    table = load_source(args.source)
    batch = embed_paths(table.paths, _face_settings(args), cache_dir=args.cache)
    print(
        f"{len(batch.paths)} photos, {int(batch.from_cache.sum())} already cached, {len(batch.no_face)} without a face"
    )
    if batch.ms_per_image:
        print("ms per photo: " + ", ".join(f"{step} {ms:.1f}" for step, ms in batch.ms_per_image.items()))
    print(f"cache: {args.cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
