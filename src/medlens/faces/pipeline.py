"""Face checkpoints end to end: train a head on dlib embeddings, then predict and explain with it.

A face checkpoint is a folder like every medlens checkpoint: ``model.safetensors`` holds the head's arrays
and ``manifest.json`` says ``"task": "multiclass"``, ``"kind": "face-embedding"``, the labels, the head and
its hyper-parameters, the detector settings (so a prediction aligns faces exactly as training did), the
embedder and the held-out metrics. :class:`FacePredictor` needs nothing else.

``train_face_head`` writes, in its run folder: ``best/`` (the checkpoint, found by ``resolve_checkpoint``),
``metrics.json`` (multiclass metrics of the held-out split, photos without a face, ms per photo),
``predictions.csv`` (held-out photos) and, unless told otherwise, ``embedding-cache/``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from medlens.config import set_dotted
from medlens.data.readers import ImageSource
from medlens.data.records import load_source
from medlens.data.splits import patient_split, read_splits, write_splits
from medlens.errors import CheckpointError, ConfigError, DataSourceError
from medlens.evaluation.metrics import multiclass_metrics, to_jsonable
from medlens.faces.detect import DEFAULT_SETTINGS, Box, DetectorSettings, NoFaceError, detect_face
from medlens.faces.embed import EMBEDDER, EMBEDDING_SIZE, EmbeddingBatch, embed_face, embed_paths
from medlens.faces.heads import UnknownClassError, create_head, load_head, save_head, top_k
from medlens.faces.occlusion import explanation_image, occlusion_map, png_bytes
from medlens.training.checkpoint import read_manifest, resolve_checkpoint

log = logging.getLogger(__name__)

FACE_KIND = "face-embedding"
CHECKPOINT_DIR = "best"
CACHE_DIR = "embedding-cache"
SPLITS_FILE = "splits.csv"


# ---------------------------------------------------------------------------------------------- predict


@dataclass
class FacePrediction:
    """What one photo gets: a probability for every class, the best k, and the face they came from."""

    probabilities: dict[str, float]
    top_k: list[tuple[str, float]]
    n_faces: int
    box: Box
    landmarks: np.ndarray
    """68 x 2 (x, y) in image pixels."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: plain floats and lists."""
        return to_jsonable(
            {
                "probabilities": self.probabilities,
                "top_k": [{"label": label, "probability": p} for label, p in self.top_k],
                "n_faces": self.n_faces,
                "box": list(self.box),
                "landmarks": self.landmarks,
            }
        )


class FacePredictor:
    """A loaded face checkpoint: photos in, probabilities of every class out."""

    def __init__(self, head: Any, settings: DetectorSettings, manifest: Mapping[str, Any], path: Path | None = None):
        self.head = head
        self.settings = settings
        self.manifest = dict(manifest)
        self.path = path
        self.labels: list[str] = [str(label) for label in head.classes_]

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> FacePredictor:
        """Load a face checkpoint folder (or a run folder's best/) without unpickling anything."""
        folder = resolve_checkpoint(path)
        manifest = read_manifest(folder)
        if manifest.get("kind") != FACE_KIND:
            raise CheckpointError(
                f"{folder} is a {manifest.get('kind', 'image-model')!r} checkpoint, not a {FACE_KIND!r} one; "
                "load it with medlens.inference.Predictor"
            )
        settings = DetectorSettings.from_dict(manifest.get("detector", {}))
        return cls(load_head(folder), settings, manifest, folder)

    def predict_embeddings(self, embeddings: Any) -> np.ndarray:
        """Probabilities (N x K, columns in :attr:`labels` order); NaN rows stay NaN (no face)."""
        x = np.atleast_2d(np.asarray(embeddings, dtype=np.float64))
        probs = np.full((len(x), len(self.labels)), np.nan)
        found = np.isfinite(x).all(axis=1)
        if found.any():
            probs[found] = self.head.predict_proba(x[found])
        return probs

    def predict_paths(
        self, paths: Sequence[str | Path], cache_dir: str | Path | None = None, progress: bool = True
    ) -> tuple[np.ndarray, EmbeddingBatch]:
        """Probabilities of many photos (NaN rows where no face was found) and their embeddings."""
        batch = embed_paths(paths, self.settings, cache_dir=cache_dir, progress=progress)
        return self.predict_embeddings(batch.embeddings), batch

    def predict_image(self, source: ImageSource | np.ndarray, *, k: int = 5, name: str | None = None) -> FacePrediction:
        """Predict one photo (path, bytes or RGB array); :class:`NoFaceError` when it shows no face."""
        found = embed_face(source, self.settings, name=name)
        probs = self.predict_embeddings(found.vector[None])[0]
        face = found.face
        return FacePrediction(
            probabilities={label: float(p) for label, p in zip(self.labels, probs, strict=True)},
            top_k=top_k(probs, k, self.labels)[0],
            n_faces=face.n_faces,
            box=face.box,
            landmarks=face.landmarks,
        )

    def explain(
        self,
        source: ImageSource | np.ndarray,
        out: str | Path | None = None,
        *,
        target: str | None = None,
        patch_size: int = 30,
        stride: int = 15,
        name: str | None = None,
    ) -> bytes:
        """PNG of the aligned face with its occlusion map (for ``target``, default the top class) and landmarks.

        Written to ``out`` too when given. The map shows where greying the face lowers the class probability.
        """
        if target is not None and target not in self.labels:
            raise UnknownClassError(f"unknown class {target!r}; this checkpoint's classes: {', '.join(self.labels)}")
        face = detect_face(source, self.settings, name=name)
        column = None if target is None else self.labels.index(target)
        found = occlusion_map(face.chip, self.head, column, patch_size=patch_size, stride=stride)
        log.info("occlusion map of %s (p = %.3f)", self.labels[found.target], found.probability)
        png = png_bytes(explanation_image(face.chip, found.heatmap, face.chip_landmarks))
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_bytes(png)
        return png


# ---------------------------------------------------------------------------------------------- train


@dataclass
class FaceTrainResult:
    checkpoint: Path
    metrics: dict[str, Any]
    """The content of metrics.json."""


def train_face_head(
    source: str | Path,
    out_dir: str | Path,
    head: str = "svm",
    *,
    head_params: Mapping[str, Any] | None = None,
    settings: DetectorSettings = DEFAULT_SETTINGS,
    cache_dir: str | Path | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    format: str | None = None,
    progress: bool = True,
) -> FaceTrainResult:
    """Embed every photo of a folder-per-class SOURCE, split by patient, fit a head, evaluate, checkpoint.

    The split is patient-grouped and class-stratified (:func:`patient_split`); photos without a patient_id
    are each their own patient, so no photo is in both parts. Photos without a face are left out and listed
    in metrics.json. ``cache_dir`` defaults to ``out_dir/embedding-cache``; share one across runs to re-fit
    heads in seconds. The checkpoint holds the head fitted on the training part, the one the metrics describe.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    out_dir = Path(out_dir)
    estimator = create_head(head, **(head_params or {}))
    table = load_source(source, format)  # type: ignore[arg-type]
    if table.task != "multiclass":
        raise DataSourceError(f"{source}: face heads need one class per photo; this source is {table.task}")
    batch = embed_paths(table.paths, settings, cache_dir or out_dir / CACHE_DIR, progress=progress)
    if batch.no_face:
        log.warning("%d of %d photos show no face and are left out", len(batch.no_face), len(table))
    kept = table.subset(np.flatnonzero(batch.has_face))
    embeddings = batch.embeddings[batch.has_face]
    names = np.asarray(kept.label_names)[kept.labels.argmax(axis=1)]
    missing = sorted(set(table.label_names) - set(names))
    if missing:
        log.warning("no photo with a face in classes %s: the head cannot predict them", missing)
    split = patient_split(kept, {"train": 1.0 - test_fraction, "test": test_fraction}, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_splits(out_dir / SPLITS_FILE, kept, split)
    train, test = split["train"], split["test"]
    estimator.fit(embeddings[train], names[train])
    labels = [str(c) for c in estimator.classes_]
    probs = estimator.predict_proba(embeddings[test])
    truth = kept.subset(test).relabel(labels).labels
    metrics = multiclass_metrics(truth, probs, labels, top_k=(1, 3, 5))
    summary = {
        "head": head,
        "head_params": estimator.get_params(),
        "embedder": EMBEDDER,
        "detector": settings.to_dict(),
        "source": str(source),
        "n_images": len(table),
        "n_no_face": len(batch.no_face),
        "no_face": [str(p.relative_to(table.root)) for p in batch.no_face],
        "n_train": len(train),
        "n_test": len(test),
        "n_test_patients": len(np.unique(kept.patient_ids[test])),
        "test_fraction": test_fraction,
        "seed": seed,
        "ms_per_image": batch.ms_per_image,
        "metrics": metrics,
    }
    checkpoint = save_head(
        estimator,
        out_dir / CHECKPOINT_DIR,
        {
            "task": "multiclass",
            "kind": FACE_KIND,
            "embedder": {"name": EMBEDDER, "size": EMBEDDING_SIZE},
            "detector": settings.to_dict(),
            "data": {k: summary[k] for k in ("source", "n_images", "n_no_face", "n_train", "n_test", "seed")},
            "metrics": {k: metrics[k] for k in ("accuracy", "balanced_accuracy", "top_k", "macro_auc")},
        },
    )
    summary = to_jsonable(summary)
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    _write_predictions(out_dir / "predictions.csv", kept.subset(test).frame, labels, probs)
    log.info(
        "%s head: top-1 %.3f on %d held-out photos; checkpoint %s", head, metrics["accuracy"], len(test), checkpoint
    )
    return FaceTrainResult(checkpoint, summary)


def evaluate_faces(
    checkpoint: str | Path,
    out: str | Path,
    source: str | Path | None = None,
    split: str | None = None,
    cache_dir: str | Path | None = None,
    n_resamples: int = 1000,
    progress: bool = True,
) -> dict[str, Any]:
    """``medlens evaluate`` for a face checkpoint: the run's own ``split`` (default test) of its data, or a
    whole other SOURCE; writes predictions.csv and metrics.json (top-1/3/5, per-class recall, confusion).

    Photos without a face cannot be ranked: they are counted in ``n_no_face`` and left out of the metrics.
    """
    from medlens.evaluation.metrics import evaluate_predictions
    from medlens.io import write_atomic

    predictor = FacePredictor.from_checkpoint(checkpoint)
    run_dir = predictor.path.parent if predictor.path is not None else Path(checkpoint)
    trained_on = Path(predictor.manifest["data"]["source"]).resolve()
    source_path = Path(source).resolve() if source is not None else trained_on
    table = load_source(source_path)
    if source_path == trained_on and (run_dir / SPLITS_FILE).is_file():
        name = split or "test"
        rows = read_splits(run_dir / SPLITS_FILE, table).get(name)
        if rows is None or len(rows) == 0:
            raise DataSourceError(f"{run_dir / SPLITS_FILE} has no {name!r} rows")
        table = table.subset(rows)
    elif split is not None:
        raise DataSourceError(f"--split {split} needs the run's own data; {source_path} is not what it trained on")
    table = table.relabel(predictor.labels)
    probs, batch = predictor.predict_paths(table.paths, cache_dir or run_dir / CACHE_DIR, progress=progress)
    found = batch.has_face
    metrics = evaluate_predictions(
        "multiclass",
        table.labels[found],
        probs[found],
        predictor.labels,
        table.patient_ids[found],
        n_resamples=n_resamples,
    )
    metrics["n_no_face"] = int((~found).sum())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frame = table.frame.assign(patient_id=table.patient_ids)
    frame["label"] = [
        predictor.labels[j] if row.any() else ""
        for row, j in zip(table.labels == 1, table.labels.argmax(1), strict=True)
    ]
    _write_predictions(out / "predictions.csv", frame, predictor.labels, np.nan_to_num(probs, nan=0.0))
    write_atomic(out / "metrics.json", json.dumps(to_jsonable(metrics), indent=2))
    return metrics


def align_faces(
    source: str | Path, out: str | Path, settings: DetectorSettings = DEFAULT_SETTINGS, progress: bool = True
) -> tuple[int, list[Path]]:
    """Write the aligned face chip of every photo as ``out/<class>/<name>.png`` plus ``out/metadata.csv``.

    The result is a folder-per-class SOURCE for the CNN route (the shipped syndromes12 config), with each
    photo's patient_id kept. Returns the number of chips written and the photos that show no face.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from medlens.io import write_atomic

    table = load_source(source)
    if table.task != "multiclass":
        raise DataSourceError(f"{source}: aligning faces needs one class per photo; this source is {table.task}")
    out = Path(out)
    classes = np.asarray(table.label_names)[table.labels.argmax(axis=1)]
    rows, no_face = [], []
    for path, label, patient in tqdm(
        zip(table.paths, classes, table.patient_ids, strict=True), total=len(table), desc="aligning",
        unit="img", disable=not progress,
    ):  # fmt: skip
        try:
            chip = detect_face(path, settings).chip
        except NoFaceError:
            no_face.append(path)
            continue
        relative = f"{label}/{path.stem}.png"
        (out / label).mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(chip).save(buffer, format="PNG")
        write_atomic(out / relative, buffer.getvalue())
        rows.append((relative, patient))
    write_atomic(out / "metadata.csv", pd.DataFrame(rows, columns=["path", "patient_id"]).to_csv(index=False))
    if no_face:
        log.warning("%d of %d photos show no face and were not aligned", len(no_face), len(table))
    return len(rows), no_face


def predict_faces_to_csv(
    checkpoint: str | Path, inputs: Sequence[str | Path], out: str | Path, progress: bool = True
) -> int:
    """``medlens predict`` for a face checkpoint: one row per photo with every class's probability."""
    from medlens.io import write_atomic
    from medlens.predict import collect_images

    predictor = FacePredictor.from_checkpoint(checkpoint)
    paths = collect_images(inputs)
    probs, batch = predictor.predict_paths(paths, progress=progress)
    frame = pd.DataFrame({"path": [str(p) for p in paths]})
    for j, label in enumerate(predictor.labels):
        frame[f"prob_{label}"] = probs[:, j]
    frame["top_class"] = [
        predictor.labels[int(np.argmax(row))] if ok else "" for row, ok in zip(probs, batch.has_face, strict=True)
    ]
    frame["n_faces"] = batch.n_faces
    frame["error"] = ["" if ok else "no face found" for ok in batch.has_face]
    write_atomic(Path(out), frame.to_csv(index=False))
    return len(frame)


def _write_predictions(path: Path, frame: pd.DataFrame, labels: list[str], probs: np.ndarray) -> None:
    table = frame[["path", "patient_id", "label"]].copy()
    table["predicted"] = [labels[j] for j in probs.argmax(axis=1)]
    for j, label in enumerate(labels):
        table[f"p_{label}"] = probs[:, j]
    table.to_csv(path, index=False)


# ---------------------------------------------------------------------------------------------- config


@dataclass
class FaceDataConfig:
    source: str = "data/syndromes12"
    format: str | None = None
    test_fraction: float = 0.2
    seed: int = 0
    cache: str | None = None


@dataclass
class FaceHeadConfig:
    name: str = "svm"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class FaceConfig:
    """A face-embedding run: ``kind: face-embedding`` plus data, faces (detector) and head sections."""

    data: FaceDataConfig = field(default_factory=FaceDataConfig)
    faces: DetectorSettings = DEFAULT_SETTINGS
    head: FaceHeadConfig = field(default_factory=FaceHeadConfig)
    kind: str = FACE_KIND

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


def is_face_config(path: str | Path) -> bool:
    """Whether a YAML config asks for the face-embedding route (``kind: face-embedding``)."""
    raw = _read_yaml(Path(path))
    return isinstance(raw, dict) and raw.get("kind") == FACE_KIND


def load_face_config(path: str | Path, overrides: Sequence[str] = ()) -> FaceConfig:
    """Read a face YAML config and ``section.key=value`` overrides, checking every key and the head."""
    raw = _read_yaml(Path(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a face config is a mapping of sections (kind, data, faces, head)")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. head.name=logistic)")
        set_dotted(raw, key.strip(), yaml.safe_load(value) if value else None)
    sections = {f.name for f in dataclasses.fields(FaceConfig)}
    unknown = sorted(set(raw) - sections)
    if unknown:
        raise ConfigError(f"{path}: unknown face config section {unknown[0]!r}; valid: {', '.join(sorted(sections))}")
    if raw.get("kind", FACE_KIND) != FACE_KIND:
        raise ConfigError(f"{path}: kind is {raw['kind']!r}; a face config has kind: {FACE_KIND}")
    config = FaceConfig(
        data=_section(FaceDataConfig, raw.get("data"), "data"),
        faces=DetectorSettings.from_dict(raw.get("faces") or {}),
        head=_section(FaceHeadConfig, raw.get("head"), "head"),
    )
    create_head(config.head.name, **config.head.params)
    return config


def train_from_config(config: FaceConfig, out_dir: str | Path, progress: bool = True) -> FaceTrainResult:
    """Train as a face config says; the config is saved as ``out_dir/config.yaml``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(config.to_yaml())
    return train_face_head(
        config.data.source,
        out_dir,
        config.head.name,
        head_params=config.head.params,
        settings=config.faces,
        cache_dir=config.data.cache,
        test_fraction=config.data.test_fraction,
        seed=config.data.seed,
        format=config.data.format,
        progress=progress,
    )


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None


def _section(cls: type, values: Any, name: str) -> Any:
    values = values or {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"config section {name!r} must be a mapping, not {values!r}")
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown config key {name}.{unknown[0]}; valid keys: {', '.join(f'{name}.{v}' for v in valid)}"
        )
    return cls(**values)
