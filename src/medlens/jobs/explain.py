"""The explain job: heatmaps for images through one checkpoint, an HTML index, and scores against boxes.

Which findings each image is explained for: the ``labels`` asked for; else, where ``boxes`` name the
image, its boxed findings (the pointing game asks about the true finding); else, multi-label, every
finding at or above its operating threshold (the top one when none is); multi-class, the predicted class.
"""

from __future__ import annotations

import html
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from medlens.data.files import image_files
from medlens.data.records import read_nih_boxes
from medlens.errors import ConfigError, DataSourceError
from medlens.explain.cam import cam_method
from medlens.explain.overlay import heatmap_png, overlay_figure
from medlens.explain.scores import Box, FindingScore, box_region, localize, summarize
from medlens.inference import OCCLUSION, Model, load_model
from medlens.io import write_atomic
from medlens.runs import PHANTOMS_DIR, SPLITS_FILE

log = logging.getLogger(__name__)

INDEX_FILE = "index.html"
SCORES_FILE = "scores.json"


@dataclass(frozen=True)
class ExplainedMap:
    """One heatmap written by :func:`explain_images`; file names are relative to its ``out``."""

    image: str
    finding: str
    probability: float
    overlay: str
    map: str


def explain_images(
    checkpoint: str | Path,
    images: Iterable[str | Path],
    out: str | Path,
    method: str | None = None,
    labels: Sequence[str] | None = None,
    boxes: str | Path | None = None,
    tolerance: float = 0.0,
    progress: bool = True,
    device: str = "auto",
) -> dict[str, Any]:
    """Explain ``images`` (files, folders of images, data CSVs) into ``out``; score against ``boxes`` if given.

    ``method``: one of the model's heatmap methods (default its first: Grad-CAM for networks, occlusion for
    probes). Writes ``<stem>__<finding>.png`` (overlay, colour bar, caption), ``<stem>__<finding>.npy`` (the
    map in the image's frame: a CAM over the image, an occlusion map over a face's aligned chip) and
    ``index.html``; with ``boxes`` (an NIH ``BBox_List_2017.csv``, which the phantom folder also holds) also
    ``scores.json``, with the pointing game's ``tolerance`` in original pixels. Returns what was written and,
    with boxes, the per-finding summary of :func:`medlens.explain.scores.summarize` under ``"scores"``.
    """
    if method is not None and method != OCCLUSION:
        cam_method(method)
    model = load_model(checkpoint, device=device)
    method = method or model.cam_methods[0]
    if method not in model.cam_methods:
        raise ConfigError(f"heatmap method {method!r} does not apply to this model; choose one of {model.cam_methods}")
    paths = image_files(images)
    asked = _check_labels(labels or [], model)
    boxed = _boxes_by_image(boxes) if boxes is not None else {}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    explained: list[ExplainedMap] = []
    scores: list[FindingScore] = []
    stems: set[str] = set()
    try:
        for path in tqdm(paths, desc=f"explaining ({method})", unit="img", disable=not progress):
            pixels = model.read(path)
            prepared = model.prepare(pixels)
            probs = model.probabilities(model.logits([prepared]).values)[0]
            if not np.isfinite(probs).all():
                log.warning("%s: no heatmap (the model gives no answer for it)", path)
                continue
            truth = _known_boxes(boxed.get(path.name, {}), model, path.name)
            stem = unique_stem(path.stem, stems)
            findings = asked or list(truth) or _default_findings(model, probs)
            maps = model.heatmaps(pixels, [model.labels.index(f) for f in findings], method, prepared)
            for finding, heatmap in zip(findings, maps, strict=True):
                probability = float(probs[model.labels.index(finding)])
                name = f"{stem}__{_slug(finding)}"
                np.save(out / f"{name}.npy", heatmap.map)
                caption = f"{finding}  p = {probability:.2f}  ({method})"
                if heatmap.marks is None:
                    overlay_figure(pixels, heatmap.map, caption, out / f"{name}.png")
                else:
                    write_atomic(out / f"{name}.png", heatmap_png(heatmap.map, heatmap.backdrop, heatmap.marks))
                explained.append(ExplainedMap(path.name, finding, probability, f"{name}.png", f"{name}.npy"))
                if finding in truth:
                    region = box_region(truth[finding], pixels.shape)
                    found = localize(heatmap.map, region, tolerance)
                    scores.append(FindingScore(path.name, finding, probability, found.hit, found.energy))
    finally:
        model.close()
    summary = summarize(scores) if boxes is not None else None
    if summary is not None:
        payload = {
            "method": method,
            "checkpoint": str(model.path),
            "boxes": str(boxes),
            "tolerance": tolerance,
            "summary": summary,
        }
        _write_json(out / SCORES_FILE, {**payload, "maps": [asdict(s) for s in scores]})
    (out / INDEX_FILE).write_text(_index_html(explained, scores, method, str(model.path)))
    return {
        "method": method,
        "n_images": len(paths),
        "n_maps": len(explained),
        "index": str(out / INDEX_FILE),
        "maps": [asdict(m) for m in explained],
        "scores": summary,
    }


def score_demo(run_dir: str | Path, method: str = "gradcam", tolerance: float = 0.0) -> dict[str, dict[str, float]]:
    """Pointing game and energy of ``method`` maps on a demo run's phantom test split, per finding.

    Each test image is explained for each of its true findings against that finding's phantom mask
    (``run_dir/phantoms/masks``); ``tolerance`` is the pointing game's allowance in original pixels.
    """
    from medlens.data.phantoms import load_phantom_masks

    run_dir = Path(run_dir)
    splits_path = run_dir / SPLITS_FILE
    if not splits_path.is_file():
        raise DataSourceError(f"{run_dir} is not a demo run folder: {SPLITS_FILE} is missing")
    splits = pd.read_csv(splits_path, dtype=str)
    test = splits.loc[splits["split"] == "test", "path"].tolist()
    if not test:
        raise DataSourceError(f"{splits_path} has no rows with split == test")
    root = run_dir / PHANTOMS_DIR
    model = load_model(run_dir)
    scores: list[FindingScore] = []
    try:
        for relative in test:
            name = Path(relative).name
            pixels = model.read(root / relative)
            prepared = model.prepare(pixels)
            probs = model.probabilities(model.logits([prepared]).values)[0]
            masks = load_phantom_masks(root, name)
            maps = model.heatmaps(pixels, [model.labels.index(f) for f in masks], method, prepared)
            for (finding, mask), heatmap in zip(masks.items(), maps, strict=True):
                found = localize(heatmap.map, mask, tolerance)
                probability = float(probs[model.labels.index(finding)])
                scores.append(FindingScore(name, finding, probability, found.hit, found.energy))
    finally:
        model.close()
    return summarize(scores)


def _default_findings(predictor: Model, probs: np.ndarray) -> list[str]:
    return predictor.positives(probs) or [predictor.labels[int(np.argmax(probs))]]


def _check_labels(labels: Sequence[str], predictor: Model) -> list[str]:
    unknown = [label for label in labels if label not in predictor.labels]
    if unknown:
        raise ConfigError(f"unknown label(s) {unknown}; this checkpoint knows {', '.join(predictor.labels)}")
    return list(dict.fromkeys(labels))


def _boxes_by_image(csv_path: str | Path) -> dict[str, dict[str, list[Box]]]:
    """image file name -> finding -> its boxes."""
    table = read_nih_boxes(csv_path)
    found: dict[str, dict[str, list[Box]]] = {}
    for row in table.itertuples(index=False):
        found.setdefault(Path(row.image).name, {}).setdefault(row.finding, []).append((row.x, row.y, row.w, row.h))
    return found


def _known_boxes(boxes: dict[str, list[Box]], predictor: Model, image: str) -> dict[str, list[Box]]:
    unknown = sorted(set(boxes) - set(predictor.labels))
    if unknown:
        log.warning("%s: boxed finding(s) %s are not labels of this checkpoint; not scored", image, unknown)
    return {finding: found for finding, found in boxes.items() if finding in predictor.labels}


def unique_stem(stem: str, taken: set[str]) -> str:
    unique, n = stem, 1
    while unique in taken:
        n += 1
        unique = f"{stem}-{n}"
    taken.add(unique)
    return unique


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "label"


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")


def _index_html(
    explained: Sequence[ExplainedMap], scores: Sequence[FindingScore], method: str, checkpoint: str
) -> str:
    scored = {(s.image, s.finding): s for s in scores}
    rows = []
    for item in explained:
        score = scored.get((item.image, item.finding))
        where = f"{'hit' if score.hit else 'miss'}, {score.energy:.0%} inside" if score else ""
        link = html.escape(item.overlay, quote=True)
        rows.append(
            f"<tr><td>{html.escape(item.image)}</td><td>{html.escape(item.finding)}</td>"
            f"<td>{item.probability:.3f}</td><td>{where}</td>"
            f'<td><a href="{link}"><img src="{link}" width="320" alt="{link}"></a></td>'
            f'<td><a href="{html.escape(item.map, quote=True)}">map</a></td></tr>'
        )
    return (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>medlens explanations</title>"
        "<style>body{font-family:sans-serif}td{padding:4px 8px;vertical-align:top}</style></head><body>\n"
        f"<h1>{html.escape(method)} explanations</h1><p>checkpoint {html.escape(checkpoint)}</p>\n"
        "<table><tr><th>image</th><th>finding</th><th>probability</th><th>localisation</th>"
        "<th>overlay</th><th>raw map</th></tr>\n" + "\n".join(rows) + "\n</table></body></html>\n"
    )
