"""medlens: explained, measured predictions from medical images, one sub-command per job.

Train transfer-learning classifiers for chest X-rays and face photos, evaluate them, explain them with
heatmaps and serve them. Research software: not for diagnosis.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from medlens import __version__
from medlens.cli_examples import add_examples
from medlens.errors import MedlensError

log = logging.getLogger("medlens")

Handler = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
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
    _add_train(jobs)
    _add_evaluate(jobs)
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


def _add_train(jobs: argparse._SubParsersAction) -> None:
    train = jobs.add_parser("train", help="train a classifier from a config: a shipped name or a YAML (torchrun: DDP)")
    train.add_argument("config", help="a shipped config's name (medlens configs lists them) or a YAML file")
    train.add_argument("--out", required=True, type=Path, help="run folder: best/, last/, history.csv")
    _override_args(train)
    train.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last")
    train.add_argument(
        "--folds",
        type=int,
        metavar="K",
        help="patient-grouped K-fold cross-validation: RUN_DIR/fold{i}/, cv_metrics.json and the ensemble/",
    )
    train.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from medlens.config import load_config
    from medlens.configs import find_config
    from medlens.faces.pipeline import is_face_config, load_face_config, train_from_config
    from medlens.training.fit import train

    path, overrides = find_config(args.config), _overrides(args)
    if is_face_config(path):
        if args.folds:
            raise MedlensError(f"--folds cross-validates image classifiers; {args.config} is a face config")
        result = train_from_config(load_face_config(path, overrides), args.out)
        print(f"face head trained: checkpoint {result.checkpoint}, top-1 {result.metrics['accuracy']:.3f}")
        return 0

    config = load_config(path, overrides)
    if args.folds:
        from medlens.training.cv import ENSEMBLE_DIR, cross_validate, format_cv

        print(format_cv(cross_validate(config, args.out, args.folds, resume=args.resume)))
        print(f"ensemble checkpoint: {args.out / ENSEMBLE_DIR}")
        return 0
    best = train(config, args.out, resume=args.resume)
    print("best epoch " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in best.items()))
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


def _add_evaluate(jobs: argparse._SubParsersAction) -> None:
    evaluate = jobs.add_parser(
        "evaluate", help="metrics with CIs and the HTML report: predictions.csv, metrics.json, report.html"
    )
    evaluate.add_argument("checkpoint", type=Path, help="run folder or checkpoint folder")
    evaluate.add_argument(
        "--data",
        dest="source",
        help="data SOURCE (default: what the run trained on); another source is scored whole, "
        "the run's own data only on its test split",
    )
    evaluate.add_argument("--out", required=True, type=Path, help="folder for predictions, metrics and report")
    evaluate.add_argument("--split", help="the run's own split to use when SOURCE is its data (default test)")
    evaluate.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of patients")
    evaluate.set_defaults(handler=_evaluate)


def _is_face_checkpoint(path: Path) -> bool:
    from medlens.training.checkpoint import read_manifest

    return read_manifest(path).get("kind") == "face-embedding"


def _evaluate(args: argparse.Namespace) -> int:
    if _is_face_checkpoint(args.checkpoint):
        from medlens.evaluation.evaluate import format_metrics
        from medlens.faces.pipeline import evaluate_faces

        metrics = evaluate_faces(args.checkpoint, args.out, args.source, args.split, n_resamples=args.resamples)
        print(format_metrics(metrics))
        print(f"{metrics['n_no_face']} photos without a face left out; wrote {args.out}/metrics.json, predictions.csv")
        return 0
    from medlens.evaluation.evaluate import evaluate, format_metrics

    result = evaluate(args.checkpoint, args.out, args.source, args.split, n_resamples=args.resamples)
    print(f"evaluated {result.metrics['evaluated_on']['description']}")
    print(format_metrics(result.metrics))
    print(f"wrote {args.out / 'predictions.csv'} and {args.out / 'metrics.json'}")
    print(f"report: {result.report}")
    return 0


def _add_explain(jobs: argparse._SubParsersAction) -> None:
    from medlens.explain.cli import add_parser

    add_parser(jobs)


def _add_serve(jobs: argparse._SubParsersAction) -> None:
    from medlens.serve.cli import add_parser

    add_parser(jobs)


def _add_faces(jobs: argparse._SubParsersAction) -> None:
    from medlens.faces.cli import add_parser

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
    predict.set_defaults(handler=_predict)


def _predict(args: argparse.Namespace) -> int:
    from medlens.inference import Predictor
    from medlens.predict import predict_to_csv

    if _is_face_checkpoint(args.checkpoint):
        from medlens.faces.pipeline import predict_faces_to_csv

        written = predict_faces_to_csv(args.checkpoint, args.inputs, args.out)
        print(f"wrote {written} rows to {args.out}")
        if args.report:
            _face_reports(args)
        return 0
    predictor = Predictor.from_checkpoint(args.checkpoint, backend=args.backend)
    written = predict_to_csv(predictor, args.inputs, args.out, args.batch_size)
    print(f"wrote {written} rows to {args.out}")
    if args.report:
        from medlens.ood import expects_chest_xrays
        from medlens.predict import write_classifier_reports

        index = write_classifier_reports(
            predictor,
            args.inputs,
            args.report,
            view=args.view,
            patient_label=args.patient_label,
            xray_guard=expects_chest_xrays(predictor.manifest),
            pdf=not args.no_pdf,
        )
        print(f"reports: {index}")
    return 0


def _face_reports(args: argparse.Namespace) -> None:
    from medlens.faces.pipeline import FacePredictor
    from medlens.predict import write_face_reports

    predictor = FacePredictor.from_checkpoint(args.checkpoint)
    pdf = not args.no_pdf
    index = write_face_reports(predictor, args.inputs, args.report, patient_label=args.patient_label, pdf=pdf)
    print(f"reports: {index}")


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
    from medlens.export import PARITY_TOLERANCE, export_onnx

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
    tune.set_defaults(handler=_tune)


def _tune(args: argparse.Namespace) -> int:
    from medlens.config import load_config
    from medlens.configs import find_config
    from medlens.tune import BEST_CONFIG_FILE, SearchSpace, tune

    config = load_config(find_config(args.config), _overrides(args))
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
    from medlens.demo import run_demo

    run_demo(args.out, args.config, args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
