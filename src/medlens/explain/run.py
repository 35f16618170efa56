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
import torch
from tqdm.auto import tqdm

from medlens.data.readers import IMAGE_SUFFIXES
from medlens.data.records import read_nih_boxes
from medlens.errors import ConfigError, DataSourceError
from medlens.explain.cam import CamExplainer, cam_method
from medlens.explain.overlay import overlay_figure
from medlens.explain.scores import Box, FindingScore, box_region, localize, summarize
from medlens.inference import Predictor

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
    method: str = "gradcam",
    labels: Sequence[str] | None = None,
    boxes: str | Path | None = None,
    tolerance: float = 0.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Explain ``images`` (files, or folders of images) into ``out``; score against ``boxes`` if given.

    Writes ``<stem>__<finding>.png`` (overlay, colour bar, caption), ``<stem>__<finding>.npy`` (the map at
    the model's input size) and ``index.html``; with ``boxes`` (an NIH ``BBox_List_2017.csv``, which the
    phantom folder also holds) also ``scores.json``, with the pointing game's ``tolerance`` in original
    pixels. Returns what was written and, with boxes, the
    per-finding summary of :func:`medlens.explain.scores.summarize` under ``"scores"``.
    """
    cam_method(method)
    predictor = Predictor.from_checkpoint(checkpoint)
    paths = image_files(images)
    asked = _check_labels(labels or [], predictor)
    boxed = _boxes_by_image(boxes) if boxes is not None else {}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    explained: list[ExplainedMap] = []
    scores: list[FindingScore] = []
    stems: set[str] = set()
    with CamExplainer(predictor.model, method) as explainer:
        for path in tqdm(paths, desc=f"explaining ({method})", unit="img", disable=not progress):
            pixels = predictor.read(path)
            x, probs = _predict(predictor, pixels)
            truth = _known_boxes(boxed.get(path.name, {}), predictor, path.name)
            stem = unique_stem(path.stem, stems)
            for finding in asked or list(truth) or _default_findings(predictor, probs):
                j = predictor.labels.index(finding)
                probability = float(probs[j])
                heatmap = predictor.heatmap_in_image(explainer(x, j), pixels)
                name = f"{stem}__{_slug(finding)}"
                np.save(out / f"{name}.npy", heatmap)
                overlay_figure(pixels, heatmap, f"{finding}  p = {probability:.2f}  ({method})", out / f"{name}.png")
                explained.append(ExplainedMap(path.name, finding, probability, f"{name}.png", f"{name}.npy"))
                if finding in truth:
                    region = box_region(truth[finding], pixels.shape)
                    found = localize(heatmap, region, tolerance)
                    scores.append(FindingScore(path.name, finding, probability, found.hit, found.energy))
    summary = summarize(scores) if boxes is not None else None
    if summary is not None:
        payload = {
            "method": method,
            "checkpoint": str(predictor.path),
            "boxes": str(boxes),
            "tolerance": tolerance,
            "summary": summary,
        }
        _write_json(out / SCORES_FILE, {**payload, "maps": [asdict(s) for s in scores]})
    (out / INDEX_FILE).write_text(_index_html(explained, scores, method, str(predictor.path)))
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
    from medlens.training.fit import SPLITS_FILE

    run_dir = Path(run_dir)
    splits_path = run_dir / SPLITS_FILE
    if not splits_path.is_file():
        raise DataSourceError(f"{run_dir} is not a demo run folder: {SPLITS_FILE} is missing")
    splits = pd.read_csv(splits_path, dtype=str)
    test = splits.loc[splits["split"] == "test", "path"].tolist()
    if not test:
        raise DataSourceError(f"{splits_path} has no rows with split == test")
    root = run_dir / "phantoms"
    predictor = Predictor.from_checkpoint(run_dir)
    scores: list[FindingScore] = []
    with CamExplainer(predictor.model, method) as explainer:
        for relative in test:
            name = Path(relative).name
            pixels = predictor.read(root / relative)
            x, probs = _predict(predictor, pixels)
            for finding, mask in load_phantom_masks(root, name).items():
                j = predictor.labels.index(finding)
                found = localize(predictor.heatmap_in_image(explainer(x, j), pixels), mask, tolerance)
                scores.append(FindingScore(name, finding, float(probs[j]), found.hit, found.energy))
    return summarize(scores)


def image_files(sources: Iterable[str | Path]) -> list[Path]:
    """The image files named, with each folder replaced by the images directly inside it (sorted)."""
    paths: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise DataSourceError(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) directly inside")
            paths += inside
        elif path.is_file():
            paths.append(path)
        else:
            raise DataSourceError(f"image {str(path)!r} does not exist")
    if not paths:
        raise DataSourceError("no images to explain: name image files or folders")
    return paths


def _predict(predictor: Predictor, pixels: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    x = predictor.to_tensor([pixels])
    return x, predictor.probabilities(x)[0]


def _default_findings(predictor: Predictor, probs: np.ndarray) -> list[str]:
    return predictor.positives(probs) or [predictor.labels[int(np.argmax(probs))]]


def _check_labels(labels: Sequence[str], predictor: Predictor) -> list[str]:
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


def _known_boxes(boxes: dict[str, list[Box]], predictor: Predictor, image: str) -> dict[str, list[Box]]:
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
