"""``medlens audit``: does a model score by recognising where an image came from, not what it shows?

Chest-X-ray classifiers trained on data whose classes come from different sources learn the source: its
text markers, borders, exposure, scanner (DeGrave, Janizek and Lee, Nature Machine Intelligence 2021). The
audit scores the images ``medlens evaluate`` would (the run's test split, or a whole other source), reads
each image once, and runs four checks (numbers from :mod:`medlens.evaluation.audit`):

1. performance per source, site, view, scanner, sex and age band, with patient-bootstrap CIs;
2. how well the source can be told from the model's embeddings and from downsampled pixels (a
   patient-grouped cross-validated linear probe), beside how much the label depends on the source;
3. how much the scores move when the outer band is covered (blanked at two widths; at the wider one also
   blurred and inpainted), and separately when the burned-in text the heuristic finds is inpainted, on a
   fixed random sample of images (``cover_images``, 48 by default: each cover costs a forward pass);
4. the share of heatmap energy inside the lung fields (masks from a folder or a CSV of boxes, the phantoms'
   own masks) or, without masks, inside the central region, named as such.

Covering happens on the model-size image, so each cover costs one forward pass and no decode; heatmaps are
drawn for a sample of images (the ones that moved most first). Writes audit.json (the numbers and the
verdicts) and audit.html (the verdicts, a per-group chart with CIs, the images that moved most with their
heatmaps). Nothing from the images but their paths is written.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from medlens.data import regions
from medlens.data.phantoms import LUNG_MASKS
from medlens.errors import ConfigError, DataSourceError
from medlens.evaluation import audit as checks
from medlens.inference import Model, load_model
from medlens.io import write_atomic
from medlens.jobs.evaluate import EvaluationData, evaluation_data

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.json"
PIXEL_SIDE = 24
"""The image-alone probe reads a 24 x 24 greyscale thumbnail (576 numbers) of each image."""
N_GRID = 6
"""Images shown with their heatmaps: those whose scores moved most when the border was covered."""
BATCH = 32


@dataclass
class Audit:
    numbers: dict[str, Any]
    path: Path
    report: Path


@dataclass
class _Pass:
    """What one read of every image leaves: model-size images, thumbnails, text boxes, scores, features."""

    prepared: list[Any]
    thumbnails: np.ndarray
    text_boxes: list[list[tuple[float, float, float, float]]]
    probs: np.ndarray
    features: np.ndarray


@dataclass(frozen=True)
class LungRegions:
    """Where the lung fields are: a folder of masks, a CSV of boxes, or neither (the central region)."""

    masks: Path | None = None
    boxes: pd.DataFrame | None = None

    @property
    def name(self) -> str:
        if self.masks is not None:
            return f"lung fields (masks in {self.masks})"
        if self.boxes is not None:
            return "lung fields (boxes from the CSV)"
        share = regions.CENTRAL_SHARE
        return f"central region ({share[0]:.0%} x {share[1]:.0%} of the image; no lung masks given)"

    def region(self, image: Path, shape: tuple[int, ...]) -> np.ndarray | None:
        """The region of one image in its own frame; None where a mask or box of it is missing."""
        if self.masks is not None:
            return regions.read_mask(self.masks, image, shape)
        if self.boxes is not None:
            from medlens.explain.scores import box_region

            rows = self.boxes[self.boxes["image"] == image.name]
            return box_region(rows[["x", "y", "w", "h"]].to_numpy(dtype=float), shape) if len(rows) else None
        return regions.central_region(shape)


def lung_regions(data: EvaluationData, masks: str | Path | None, boxes: str | Path | None) -> LungRegions:
    """The lung regions the user named, else the phantoms' own masks, else none (the central region)."""
    if masks is not None and boxes is not None:
        raise ConfigError("give lung masks as a folder (--masks) or as boxes (--lung-boxes), not both")
    if masks is not None:
        if not Path(masks).is_dir():
            raise DataSourceError(f"--masks {masks}: not a folder; give a folder of <image stem>.png masks")
        return LungRegions(masks=Path(masks))
    if boxes is not None:
        return LungRegions(boxes=read_lung_boxes(boxes))
    root = data.source if data.source.is_dir() else data.source.parent
    return LungRegions(masks=root / LUNG_MASKS) if (root / LUNG_MASKS).is_dir() else LungRegions()


def read_lung_boxes(path: str | Path) -> pd.DataFrame:
    """A CSV of lung boxes: ``image`` (or ``path``: the file name is used), ``x``, ``y``, ``w``, ``h`` in pixels."""
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise DataSourceError(f"--lung-boxes {path}: cannot be read as a CSV ({exc})") from None
    if "image" not in frame.columns and "path" in frame.columns:
        frame["image"] = frame["path"].map(lambda p: Path(str(p)).name)
    missing = [c for c in ("image", "x", "y", "w", "h") if c not in frame.columns]
    if missing:
        raise DataSourceError(f"--lung-boxes {path}: missing column(s) {', '.join(missing)}; needs image,x,y,w,h")
    return frame


def audit(
    checkpoint: str | Path,
    out: str | Path,
    source: str | Path | None = None,
    split: str | None = None,
    masks: str | Path | None = None,
    lung_boxes: str | Path | None = None,
    n_resamples: int = 1000,
    cam_images: int = 16,
    cover_images: int = 48,
    method: str | None = None,
    device: str = "auto",
    progress: bool = True,
) -> Audit:
    """Run every check on the images ``medlens evaluate`` would score; write audit.json and audit.html."""
    if cam_images < 0:
        raise ConfigError(f"--cam-images must be 0 or more images, not {cam_images}")
    if cover_images < 1:
        raise ConfigError(f"--cover-images must be 1 or more images, not {cover_images}")
    model = load_model(checkpoint, device=device)
    if method is not None and method not in model.cam_methods:
        raise ConfigError(f"unknown heatmap method {method!r} for this model; choose one of {model.cam_methods}")
    data = evaluation_data(model, source, split)
    lungs = lung_regions(data, masks, lung_boxes)
    seen = _read_and_score(model, data.table.paths, progress)
    answered = np.isfinite(seen.probs).all(axis=1)
    if not answered.any():
        raise DataSourceError(f"the model answered for none of the {len(answered)} images")
    keep = np.flatnonzero(answered)
    table = data.table.subset(keep)
    seen = _Pass([seen.prepared[i] for i in keep], seen.thumbnails[keep], [seen.text_boxes[i] for i in keep],
                 seen.probs[keep], seen.features[keep])  # fmt: skip
    frame = checks.with_site(table.frame, table.patient_ids)
    numbers: dict[str, Any] = {
        "evaluated_on": {**data.describe(), "date": datetime.now(UTC).isoformat(timespec="seconds")},
        "model": model.description,
        "task": model.task,
        "labels": model.labels,
        "n_images": len(table),
        "n_left_out": int((~answered).sum()),
    }
    numbers["groups"] = checks.group_performance(
        model.task, table.labels, seen.probs, table.patient_ids, frame, n_resamples=n_resamples
    )
    numbers["source"] = _source_check(model, table, frame, seen)
    sample = _sample(len(table), cover_images)
    covers, moved = _border_check(model, table, seen, sample)
    numbers["border"] = {"n_images": len(sample), "covers": covers}
    numbers["text"] = _text_check(model, table, seen, sample)
    rows = _heatmap_rows(moved, cam_images)
    method = method or model.cam_methods[0]
    evidence, grid = _evidence(model, table, seen, rows, lungs, method)
    numbers["evidence"] = evidence
    for picture in grid:
        picture["moved"] = float(moved[picture["row"]])
    numbers["verdicts"] = checks.verdicts(numbers)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / AUDIT_FILE
    write_atomic(path, json.dumps(numbers, indent=2))
    from medlens.reports.audit import write_audit_report

    report = write_audit_report(out, numbers, grid)
    return Audit(numbers, path, report)


def _read_and_score(model: Model, paths: Sequence[Path], progress: bool) -> _Pass:
    """Read every image once: keep its model-size image, a thumbnail and its text boxes; score it."""
    prepared: list[Any] = []
    thumbnails, boxes, logits, features = [], [], [], []
    bar = tqdm(total=len(paths), desc="auditing", unit="img", disable=not progress)
    for start in range(0, len(paths), BATCH):
        chunk = []
        for path in paths[start : start + BATCH]:
            pixels = model.read(path)
            chunk.append(model.prepare(pixels))
            thumbnails.append(_thumbnail(pixels))
            boxes.append(regions.find_text(pixels))
        scores, vectors = model.logits_and_features(chunk)
        logits.append(scores.values)
        features.append(vectors)
        prepared.extend(chunk)
        bar.update(len(chunk))
    bar.close()
    return _Pass(prepared, np.stack(thumbnails), boxes, model.probabilities(np.concatenate(logits)),
                 np.concatenate(features))  # fmt: skip


def _thumbnail(pixels: np.ndarray) -> np.ndarray:
    grey = pixels if pixels.ndim == 2 else pixels.mean(axis=2)
    return cv2.resize(grey.astype(np.float32), (PIXEL_SIDE, PIXEL_SIDE), interpolation=cv2.INTER_AREA).ravel()


def _probs_of(model: Model, images: Sequence[Any]) -> np.ndarray:
    parts = [model.logits(list(images[s : s + BATCH])).values for s in range(0, len(images), BATCH)]
    return model.probabilities(np.concatenate(parts))


def _source_check(model: Model, table: Any, frame: pd.DataFrame, seen: _Pass) -> dict[str, Any]:
    column = checks.source_column(frame)
    if column is None:
        return {"column": None}
    sources = frame[column].where(frame[column].notna(), None).tolist()
    return {
        "column": column,
        "from_embeddings": checks.source_probe(seen.features, sources, table.patient_ids),
        "from_pixels": checks.source_probe(seen.thumbnails, sources, table.patient_ids),
        "label_dependence": checks.label_dependence(table.labels, sources, model.task, model.labels),
        "n_per_source": {str(k): int(v) for k, v in frame[column].value_counts().items()},
    }


def _sample(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``size`` of ``n`` rows drawn at random (a fixed seed), in order; all of them when there are fewer."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def _border_check(
    model: Model, table: Any, seen: _Pass, sample: np.ndarray
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The outer band covered on the sampled images: blanked at every width, and at the widest also blurred and
    inpainted; and how much each image moved (0 outside the sample)."""
    covers = []
    moved = np.zeros(len(table))
    shape = np.asarray(seen.prepared[0]).shape
    widths = list(zip(regions.BORDER_SHARES, regions.border_widths(shape), strict=True))
    plan = [(*widths[k], "blank") for k in range(len(widths) - 1)] + [(*widths[-1], m) for m in regions.COVER_MODES]
    for share, width, mode in plan:
        covered = [regions.cover(p, regions.border_band(np.asarray(p).shape, _width(p, share, width, shape)), mode)
                   for p in (seen.prepared[i] for i in sample)]  # fmt: skip
        change = checks.score_change(
            model.task, table.labels[sample], seen.probs[sample], _probs_of(model, covered), model.labels,
            model.thresholds,
        )  # fmt: skip
        moved[sample] = np.maximum(moved[sample], change.pop("per_image"))
        covers.append({"width_share": share, "width_px": width, "mode": mode, **change})
    return covers, moved


def _width(image: Any, share: float, width: int, shape: tuple[int, ...]) -> int:
    """The band width for this image: ``width`` when all images have one size, else its own share."""
    own = np.asarray(image).shape
    return width if own[:2] == shape[:2] else regions.border_widths(own, (share,))[0]


def _text_check(model: Model, table: Any, seen: _Pass, sample: np.ndarray) -> dict[str, Any]:
    with_text = [int(i) for i in sample if seen.text_boxes[i]]
    found = {"n_images": len(sample), "n_with_text": len(with_text), "mode": "inpaint", "change": None,
             "n_with_text_of_all": sum(bool(boxes) for boxes in seen.text_boxes), "n_all": len(table)}  # fmt: skip
    if not with_text:
        return found
    covered = [
        regions.cover(seen.prepared[i], regions.box_mask(seen.text_boxes[i], np.asarray(seen.prepared[i]).shape),
                      "inpaint")
        for i in with_text
    ]  # fmt: skip
    change = checks.score_change(
        model.task, table.labels[with_text], seen.probs[with_text], _probs_of(model, covered), model.labels,
        model.thresholds,
    )  # fmt: skip
    change.pop("per_image")
    return {**found, "change": change}


def _heatmap_rows(moved: np.ndarray, cam_images: int, seed: int = 0) -> list[int]:
    """The images that moved most (up to N_GRID), then a fixed random sample, ``cam_images`` in all."""
    if cam_images == 0:
        return []
    top = [int(i) for i in np.argsort(-moved, kind="stable")[: min(N_GRID, cam_images)]]
    rest = [int(i) for i in np.random.default_rng(seed).permutation(len(moved)) if int(i) not in top]
    return top + rest[: max(0, cam_images - len(top))]


def _evidence(
    model: Model, table: Any, seen: _Pass, rows: list[int], lungs: LungRegions, method: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Heatmap energy inside the lung region on ``rows``; the first N_GRID rows also come back as pictures."""
    energies, areas, grid = [], [], []
    no_region = 0
    paths = table.paths
    from medlens.explain.scores import localize

    for k, i in enumerate(rows):
        pixels = model.read(paths[i])
        region = lungs.region(paths[i], pixels.shape)
        if region is None or not region.any():
            no_region += 1
            continue
        target = int(np.argmax(seen.probs[i]))
        heatmap = model.heatmaps(pixels, [target], method, prepared=seen.prepared[i])[0]
        found = localize(heatmap.map, region)
        energies.append(found.energy)
        areas.append(float(region.mean()))
        if k < N_GRID:
            grid.append({"row": i, "image": paths[i].name, "label": model.labels[target],
                         "prepared": seen.prepared[i], "heatmap": heatmap, "energy": found.energy})  # fmt: skip
    model.close()
    summary = checks.evidence_share(energies, areas)
    return {**summary, "region": lungs.name, "method": method, "n_without_region": no_region}, grid
