"""The X-ray guard (``medlens.ood``): what it costs per real film, and how often it flags real chest X-rays
and grey pictures that are not.

1. Cost: ``assess_upload`` on every real film in ../shared (cxr4 + nih14), the file already read, as the
   server runs it beside the forward pass, plus for a colour file the small colour copy the reader keeps
   for it (``colour_sample``): CPU milliseconds per film (each film's best of ``--repeats`` calls),
   min/median/max over films. Goal: <= 3 ms for every film.
2. Rates: every image is encoded as the file a user would upload (grey JPEG at quality 90 or grey PNG,
   alternately for synthetic pictures) and judged by ``assess_upload(load_image(data))``:
   - real X-rays: all 344 of ``cxr4`` and ``nih14`` as they are, and each printed and scanned (contrast
     squeezed towards paper, blur, a tilt of up to 3 degrees, sensor noise);
   - grey photos: the 499 ``faces-lfw15`` photos and 8 ``face-probes`` made grey; each also scanned,
     scanned lying on a larger page, and (faces) cropped closer, without LFW's black corners; and the
     same photos as they are, in colour (``colour-photo``, not counted among the grey pictures);
   - synthetic grey pictures: text pages (some scanned), gradients, noise (white, blurred, 1/f), flat
     shapes, patterns (gratings, checkerboards, dots), all from fixed seeds;
   - medlens phantoms (the demo's synthetic films), which the demo and the server's tests need passed.
   Goals: >= 98% of the grey photos and of all grey non-X-rays flagged, <= 1% of the real X-rays.
3. Held out: the limits of the two checks added for grey photos (``midline``, ``structure``) were chosen
   looking at these images. Here each is re-derived by a fixed rule (a quantile of the films' values times
   a margin, see ``RULES``) from the films of all but one X-ray source, then applied to that source's films
   and to every non-X-ray; and the face rate per person.

    .venv/bin/python benchmarks/ood.py [--repeats 3] [--phantoms 200]

The last line is one JSON object: ``ms_per_film`` (median), ``grey_photos_flagged``, ``grey_non_xrays_flagged``,
``xrays_flagged`` (shares; counts in the printed tables) and the held-out figures.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import common  # noqa: F401  (first: medlens sets torch's OpenMP policy before torch loads)
import cv2
import numpy as np
from common import SHARED, machine, spread
from PIL import Image, ImageDraw, ImageFont

from medlens.data.phantoms import generate_phantoms
from medlens.data.readers import colour_sample, load_image
from medlens.ood import CHECKS, FLAG_AT, Check, assess_upload

SEED = 0
SUFFIXES = {".png", ".jpg", ".jpeg"}
SOURCES = {
    "GeneralBlockchain/covid-19-chest-xray-lung-bounding-boxes-dataset": "ieee8023",
    "agchung/Actualmed-COVID-chestxray-dataset": "Actualmed",
    "agchung/Figure1-COVID-chestxray-dataset": "Figure1",
}
"""Where cxr4's films that are not NIH's come from (its ``source_repo``), by the collection's name."""
XRAY_KINDS = ("xray", "xray-scan", "phantom")
PHOTO_KINDS = ("face", "probe")
"""The photos made grey; ``colour-photo`` is the same photos as they are, and not counted among grey pictures."""
NOT_GREY_PICTURES = (*XRAY_KINDS, "colour-photo")
RULES = {"midline": (0.99, 1.35), "structure": (0.01, 0.56)}
"""How a held-out fold sets a new check's flag point from its training films: (quantile, factor); on all 344
films these give the flag points the checks have (0.30, 0.175), so a fold redoes the choice without its source."""
WORDS = (
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "patient", "study",
    "image", "report", "results", "table", "figure", "method", "data", "analysis", "clinical", "chest", "value",
    "mean", "total", "group", "control", "score", "page", "section", "see", "above", "below",
)  # fmt: skip


@dataclass
class Sample:
    """One judged image: what it is, and what it is held out with (X-ray source, person, probe, kind)."""

    kind: str
    group: str
    name: str
    measures: dict[str, float]
    fired: list[str]


def samples(phantoms: int, seed: int = SEED) -> list[Sample]:
    """Every image of the module docstring, judged; the same list for the same seed."""
    rng = np.random.default_rng(seed)
    out = []
    for kind, group, name, data in _images(rng, phantoms):
        result = assess_upload(load_image(data))
        fired = [check for check, score in result.checks.items() if score >= FLAG_AT]
        out.append(Sample(kind, group, name, result.measures, fired))
    return out


def _images(rng: np.random.Generator, phantoms: int) -> Iterator[tuple[str, str, str, bytes]]:
    """(kind, group, name, file bytes) of every image."""
    for path, source in xray_files():
        data = path.read_bytes()
        name = str(path.relative_to(SHARED))
        yield "xray", source, name, data
        yield "xray-scan", source, name, encode(scan(_grey(data), rng))
    for folder, kind in (("faces-lfw15", "face"), ("face-probes", "probe")):
        for path in _files(SHARED / folder):
            group = path.parent.name if kind == "face" else path.name
            name = str(path.relative_to(SHARED))
            data = path.read_bytes()
            yield "colour-photo", group, name, data
            grey = _grey(data)
            yield kind, group, name, encode(grey)
            yield f"{kind}-scan", group, name, encode(scan(grey, rng))
            yield f"{kind}-page", group, name, encode(scan(grey, rng, page=True))
            if kind == "face":
                yield "face-crop", group, name, encode(closer(grey, rng))
    for kind, make, count in SYNTHETIC:
        for i in range(count):
            pixels = make(rng)
            yield kind, kind, f"{kind} {i}", encode(pixels, "PNG" if i % 2 else "JPEG")
            if kind == "document" and i % 3 == 0:
                yield "document-scan", kind, f"{kind} {i}", encode(scan(pixels, rng))
    with tempfile.TemporaryDirectory() as folder:
        for path in sorted(generate_phantoms(Path(folder), n=phantoms, progress=False).glob("images/*.png")):
            yield "phantom", "phantom", path.name, path.read_bytes()


def xray_files() -> list[tuple[Path, str]]:
    """(path, source) of every real chest film; NIH films reached cxr4 through muhammedtalo/COVID-19."""
    films = []
    with open(SHARED / "cxr4" / "metadata.csv", newline="") as f:
        for row in csv.DictReader(f):
            source = "NIH" if row["patient_id"].startswith("nih:") else SOURCES[row["source_repo"]]
            films.append((SHARED / "cxr4" / row["path"], source))
    return films + [(path, "NIH") for path in _files(SHARED / "nih14" / "images")]


def encode(grey: np.ndarray, fmt: str = "JPEG") -> bytes:
    """A float [0, 1] grey image as the bytes of a grey JPEG (quality 90) or PNG."""
    buffer = io.BytesIO()
    image = Image.fromarray(np.clip(grey * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def scan(grey: np.ndarray, rng: np.random.Generator, page: bool = False) -> np.ndarray:
    """A print of ``grey`` scanned: contrast squeezed towards paper, blur, a tilt of up to 3 degrees, sensor
    noise; with ``page``, the print lies on a larger sheet (light margins)."""
    lo, hi = rng.uniform(0.05, 0.35), rng.uniform(0.7, 0.97)
    pixels = cv2.GaussianBlur(lo + (hi - lo) * grey.astype(np.float32), (0, 0), rng.uniform(0.4, 1.5))
    if page:
        height, width = pixels.shape
        sheet = np.full((int(height * rng.uniform(1.3, 2.2)), int(width * rng.uniform(1.2, 1.8))), rng.uniform(0.85, 1))
        y, x = rng.integers(0, sheet.shape[0] - height + 1), rng.integers(0, sheet.shape[1] - width + 1)
        sheet[y : y + height, x : x + width] = pixels
        pixels = sheet.astype(np.float32)
    height, width = pixels.shape
    tilt = cv2.getRotationMatrix2D((width / 2, height / 2), rng.uniform(-3, 3), 1.0)
    pixels = cv2.warpAffine(pixels, tilt, (width, height), borderMode=cv2.BORDER_REPLICATE)
    return np.clip(pixels + rng.normal(0, rng.uniform(0.005, 0.03), pixels.shape), 0, 1)


def closer(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A tighter square crop of a face photo (55-80% of its side), without LFW's black corners."""
    height, width = grey.shape
    side = int(min(height, width) * rng.uniform(0.55, 0.8))
    y = int((height - side) * rng.uniform(0.2, 0.8))
    x = (width - side) // 2
    return grey[y : y + side, x : x + side]


def text_page(rng: np.random.Generator) -> np.ndarray:
    """A page of lines of words and rules, portrait or landscape, dark ink on light paper."""
    width = int(rng.integers(500, 1300))
    height = int(width * (rng.uniform(1.0, 1.5) if rng.random() < 0.7 else rng.uniform(0.6, 1.0)))
    ink = int(rng.integers(0, 90))
    image = Image.new("L", (width, height), int(rng.integers(215, 256)))
    draw = ImageDraw.Draw(image)
    size = int(rng.integers(10, 40))
    font = ImageFont.load_default(size=size)
    margin = int(width * rng.uniform(0.04, 0.15))
    y = margin
    while y < height - margin:
        if rng.random() < 0.08:
            draw.rectangle([margin, y, width - margin, y + int(rng.integers(2, 6))], fill=ink)
            y += size
        else:
            draw.text((margin, y), " ".join(rng.choice(WORDS, int(rng.integers(3, 18)))), fill=ink, font=font)
            y += int(size * rng.uniform(1.2, 2.0))
    return np.asarray(image, np.float32) / 255.0


def gradient(rng: np.random.Generator) -> np.ndarray:
    """A linear gradient at any angle or a radial one, either polarity, over part of the range, a little noise."""
    n = int(rng.integers(256, 1024))
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(angle) * xx + np.sin(angle) * yy
    else:
        cy, cx = rng.uniform(0.2, 0.8, 2)
        ramp = np.hypot(yy - cy, xx - cx)
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    if rng.random() < 0.5:
        ramp = 1 - ramp
    lo, hi = sorted(rng.uniform(0, 1, 2))
    return np.clip(lo + (hi - lo + 0.05) * ramp + rng.normal(0, rng.uniform(0, 0.03), ramp.shape), 0, 1)


def noise(rng: np.random.Generator) -> np.ndarray:
    """White noise, noise blurred at a random scale (smooth blobs), or 1/f noise (cloud-like)."""
    n = int(rng.integers(256, 1024))
    kind = rng.integers(0, 3)
    pixels = rng.random((n, n), dtype=np.float32)
    if kind == 1:
        pixels = cv2.GaussianBlur(pixels, (0, 0), rng.uniform(1, n / 12))
    elif kind == 2:
        f = np.fft.fftfreq(n)
        radius = np.hypot(*np.meshgrid(f, f))
        radius[0, 0] = 1
        spectrum = np.fft.fft2(rng.normal(size=(n, n))) / radius ** rng.uniform(0.8, 1.6)
        pixels = np.real(np.fft.ifft2(spectrum)).astype(np.float32)
    return (pixels - pixels.min()) / (pixels.max() - pixels.min())


def shapes(rng: np.random.Generator) -> np.ndarray:
    """Flat ellipses and rectangles of random greys on a random ground, softened: clip art, diagrams."""
    width, height = (int(v) for v in rng.integers(300, 1000, 2))
    image = Image.new("L", (width, height), int(rng.integers(0, 256)))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 25))):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, 2))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=int(rng.integers(0, 256)))
    return cv2.GaussianBlur(np.asarray(image, np.float32) / 255.0, (0, 0), rng.uniform(0.5, 8))


def pattern(rng: np.random.Generator) -> np.ndarray:
    """A sine grating at any angle and period, a checkerboard, or a grid of dots."""
    n = int(rng.integers(256, 1024))
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    period = rng.uniform(6, n / 3)
    kind = rng.integers(0, 3)
    if kind == 0:
        angle = rng.uniform(0, np.pi)
        pixels = 0.5 + 0.5 * np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period)
    elif kind == 1:
        pixels = ((xx // period + yy // period) % 2).astype(np.float32)
    else:
        pixels = (np.hypot((xx % period) - period / 2, (yy % period) - period / 2) < period / 4).astype(np.float32)
    lo, hi = sorted(rng.uniform(0, 1, 2))
    return cv2.GaussianBlur(lo + (hi - lo + 0.05) * pixels, (0, 0), rng.uniform(0.3, 2))


SYNTHETIC: tuple[tuple[str, Callable[[np.random.Generator], np.ndarray], int], ...] = (
    ("document", text_page, 150),
    ("gradient", gradient, 100),
    ("noise", noise, 150),
    ("shapes", shapes, 100),
    ("pattern", pattern, 100),
)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES)


def _grey(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"), np.float32) / 255.0


def ms_per_film(repeats: int) -> dict[str, list[float]]:
    """CPU ms of the guard per real film (best of ``repeats``), each film read once beforehand, by file: the
    nih14 films (1024 px grey PNG, what the server benchmark sends), the other grey files, and colour files,
    whose cost includes the colour copy the reader makes for the guard."""
    ms: dict[str, list[float]] = {"nih14 1024 px grey": [], "other grey": [], "colour": []}
    for path, _ in xray_files():
        data = path.read_bytes()
        loaded = load_image(data)
        rgb = load_image(data, channels=3).pixels if loaded.colour is not None else None
        best = float("inf")
        for _ in range(repeats):
            start = time.process_time()
            if rgb is not None:
                colour_sample(rgb)
            assess_upload(loaded)
            best = min(best, time.process_time() - start)
        file = "colour" if rgb is not None else "nih14 1024 px grey" if "nih14" in path.parts else "other grey"
        ms[file].append(best * 1000)
    return ms


def table(data: list[Sample]) -> dict[str, tuple[int, int, Counter]]:
    """Per kind: (flagged, images, how often each check fired)."""
    out = {}
    for kind in dict.fromkeys(s.kind for s in data):
        rows = [s for s in data if s.kind == kind]
        out[kind] = (sum(bool(s.fired) for s in rows), len(rows), Counter(n for s in rows for n in s.fired))
    return out


def held_out(data: list[Sample]) -> dict[str, dict[str, object]]:
    """Per X-ray source: ``RULES``' flag points from the other sources' films, and what they flag."""
    sources = sorted({s.group for s in data if s.kind == "xray"})
    out = {}
    for source in sources:
        train = [s.measures for s in data if s.kind == "xray" and s.group != source]
        checks = dict(CHECKS)
        for name, (quantile, factor) in RULES.items():
            checks[name] = _with_flag_point(CHECKS[name], factor * np.quantile([m[name] for m in train], quantile))
        films = [s for s in data if s.kind == "xray" and s.group == source]
        others = [s for s in data if s.kind not in NOT_GREY_PICTURES]
        photos = [s for s in others if s.kind in PHOTO_KINDS]
        out[source] = {
            "flag_points": {name: round(float(_flag_point(checks[name])), 3) for name in RULES},
            "films": (sum(_flags(s, checks) for s in films), len(films)),
            "grey_photos": (sum(_flags(s, checks) for s in photos), len(photos)),
            "grey_non_xrays": (sum(_flags(s, checks) for s in others), len(others)),
        }
    return out


def _with_flag_point(check: Check, flag_point: float) -> Check:
    """``check`` moved so that it scores FLAG_AT at ``flag_point``, its span kept."""
    shift = flag_point - _flag_point(check)
    return replace(check, typical=check.typical + shift, atypical=check.atypical + shift)


def _flag_point(check: Check) -> float:
    return check.typical + FLAG_AT * (check.atypical - check.typical)


def _flags(sample: Sample, checks: dict[str, Check]) -> bool:
    return any(check.score(sample.measures[name]) >= FLAG_AT for name, check in checks.items())


def share(rows: list[tuple[int, int]]) -> tuple[int, int]:
    return sum(r[0] for r in rows), sum(r[1] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--phantoms", type=int, default=200)
    args = parser.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED} is absent: this benchmark needs ../shared/data")
    print(f"machine: {machine()}")
    by_file = ms_per_film(args.repeats)
    ms = [m for values in by_file.values() for m in values]
    print(f"assess_upload per real film, CPU ms (best of {args.repeats}) min/median/max (goal <= 3):")
    for file, values in {"all": ms, **by_file}.items():
        print(f"  {file:20s} {len(values):3d} films  {spread(values, 2)}  over 3 ms: {sum(m > 3 for m in values)}")
    data = samples(args.phantoms)
    rates = table(data)
    print_rates(data, rates)
    folds = held_out(data)
    print_held_out(data, folds)
    photos = share([rates[k][:2] for k in PHOTO_KINDS])
    grey = share([rates[k][:2] for k in rates if k not in NOT_GREY_PICTURES])
    held_films = share([fold["films"] for fold in folds.values()])
    print(json.dumps({
        "ms_per_film": round(statistics.median(ms), 3),
        "ms_per_nih14_film_max": round(max(by_file["nih14 1024 px grey"]), 3),
        "ms_per_colour_film_max": round(max(by_file["colour"]), 3),
        "films_over_3_ms": sum(m > 3 for m in ms),
        "grey_photos_flagged": _rate(photos),
        "colour_photos_flagged": _rate(rates["colour-photo"]),
        "grey_non_xrays_flagged": _rate(grey),
        "xrays_flagged": _rate(rates["xray"]),
        "xray_scans_flagged": _rate(rates["xray-scan"]),
        "phantoms_flagged": _rate(rates["phantom"]),
        "held_out_xrays_flagged": _rate(held_films),
        "held_out_grey_photos_flagged_min": min(_rate(fold["grey_photos"]) for fold in folds.values()),
    }))  # fmt: skip


def print_rates(data: list[Sample], rates: dict[str, tuple[int, int, Counter]]) -> None:
    print("\nflagged per kind (checks that fired)")
    for kind, (flagged, images, checks) in rates.items():
        fired = ", ".join(f"{name} {n}" for name, n in checks.most_common()) or "none"
        print(f"  {kind:14s} {flagged:4d} / {images:4d}  {flagged / images:6.1%}  ({fired})")
    photos = share([rates[k][:2] for k in PHOTO_KINDS])
    grey = share([rates[k][:2] for k in rates if k not in NOT_GREY_PICTURES])
    print(f"\ngrey photos flagged {_counts(photos)} (goal >= 98%)")
    print(f"the same photos in colour flagged {_counts(rates['colour-photo'])}")
    print(f"all grey non-X-rays flagged {_counts(grey)} (goal >= 98%)")
    print(f"real X-rays flagged {_counts(rates['xray'])} (goal <= 1%)")
    for s in data:
        if s.kind == "xray" and s.fired:
            print(f"  flagged film {s.name} ({s.group}): {', '.join(s.fired)}")
    passed = [f"{s.name} ({s.kind})" for s in data if s.kind in PHOTO_KINDS and not s.fired]
    print(f"grey photos passed: {', '.join(passed) or 'none'}")
    people = sorted({s.group for s in data if s.kind == "face"})
    per_person = [np.mean([bool(s.fired) for s in data if s.kind == "face" and s.group == p]) for p in people]
    print(f"grey faces flagged per person: lowest {min(per_person):.1%} ({people[int(np.argmin(per_person))]})")
    for name in RULES:
        films = np.array([s.measures[name] for s in data if s.kind == "xray"])
        faces = np.array([s.measures[name] for s in data if s.kind == "face"])
        print(
            f"{name}: films p1/p50/p99/max {np.percentile(films, 1):.3f}/{np.median(films):.3f}/"
            f"{np.percentile(films, 99):.3f}/{films.max():.3f}; grey faces p1/p50/p99 "
            f"{np.percentile(faces, 1):.3f}/{np.median(faces):.3f}/{np.percentile(faces, 99):.3f}; "
            f"flag point {_flag_point(CHECKS[name]):.3f}"
        )


def print_held_out(data: list[Sample], folds: dict[str, dict[str, object]]) -> None:
    films = [s.measures for s in data if s.kind == "xray"]
    rule = {name: round(f * float(np.quantile([m[name] for m in films], q)), 3) for name, (q, f) in RULES.items()}
    print(f"\nheld out by X-ray source (flag points = factor x quantile of the other sources' films, {RULES}; "
          f"on all films {rule})")  # fmt: skip
    for source, fold in folds.items():
        print(
            f"  {source:10s} flag points {fold['flag_points']}: its films flagged {_counts(fold['films'])}, "
            f"grey photos {_counts(fold['grey_photos'])}, grey non-X-rays {_counts(fold['grey_non_xrays'])}"
        )
    worst_photos = min(_rate(fold["grey_photos"]) for fold in folds.values())
    worst_grey = min(_rate(fold["grey_non_xrays"]) for fold in folds.values())
    print(
        f"  all sources: films flagged {_counts(share([fold['films'] for fold in folds.values()]))}; grey photos "
        f"flagged >= {worst_photos:.1%}, grey non-X-rays >= {worst_grey:.1%} in every fold"
    )


def _rate(counts: tuple[int, ...]) -> float:
    return round(counts[0] / counts[1], 4)


def _counts(counts: tuple[int, ...]) -> str:
    return f"{counts[0]} / {counts[1]} = {counts[0] / counts[1]:.1%}"


if __name__ == "__main__":
    main()
