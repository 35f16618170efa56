"""The embedded default data set: synthetic, deterministic chest-X-ray-like phantoms with known masks.

Each image is a frontal radiograph look-alike: soft tissue, two dark lung fields with vessel markings,
mediastinum, heart shadow, spine, ribs and clavicles, with smooth per-patient anatomy variation, a few
degrees of rotation, blur and film noise. Findings are drawn with a binary mask each, so localization
(Grad-CAM versus the truth) can be scored: the boxes in ``BBox_List_2017.csv`` are the masks' bounding
boxes, in the NIH layout. Findings keep their side: nothing is ever mirrored.

Every image has its own random generator, derived from ``(seed, image index)`` (anatomy from
``(seed, patient index)``), so the same arguments always give byte-identical files.

Each patient comes from one of a few made-up sites (the ``source`` column), drawn independently of the
findings. With ``marker=True`` (multi-class only) the set is made to cheat, as the COVID-19 collections did
without meaning to: each class comes from a site of its own, and that site stamps its films with a bright
mark in a corner (a corner per site; two marks side by side for the fifth site on). A model can then score
perfectly by reading the stamp, and ``medlens audit`` must say so. The lung fields of every image are
written too (``masks/lungs/<stem>.png``), for the audit's "where the evidence lies".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from medlens.data.records import NO_FINDING
from medlens.errors import ConfigError, DataSourceError
from medlens.io import write_atomic

log = logging.getLogger(__name__)

FINDINGS = ("nodule", "effusion", "consolidation", "cardiomegaly", "pneumothorax")
NORMAL = "normal"
TASKS = ("multiclass", "multilabel")
FINDING_RATE = 0.22
"""Multi-label: the chance of each finding, independently; about 29% of images then have none."""

BOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
BOX_FILE = "BBox_List_2017.csv"
LUNG_MASKS = "masks/lungs"
"""Where each phantom's lung-field mask is written, as ``<image stem>.png``."""
SITES = ("site-a", "site-b", "site-c")
"""The made-up sites of an honest phantom set; a marker set has one site per class, ``site-<class>``."""
MARKER_SIZE = 0.05
MARKER_OFFSET = 0.01
"""A marker's side and its distance from the image's edges, as shares of the image side."""
_IMAGES_PER_PATIENT = ((1, 0.78), (2, 0.16), (3, 0.06))  # 1.28 images per patient on average
_AP_RATE = 0.3
_PNG_LEVEL = 3

Task = Literal["multiclass", "multilabel"]


@dataclass(frozen=True)
class _Shot:
    """One image to draw: who, which follow-up, which findings."""

    index: int
    patient: int
    follow_up: int
    findings: tuple[str, ...]
    sex: str
    age: int
    view: str

    @property
    def name(self) -> str:
        return f"ph{self.patient:05d}_{self.follow_up:03d}.png"


@dataclass(frozen=True)
class _Anatomy:
    """One patient's body, in units of the image side; index 0 is the image-left lung (patient's right)."""

    cx: float
    top: tuple[float, float]
    base: tuple[float, float]
    lateral: tuple[float, float]
    medial: tuple[float, float]
    dome: tuple[float, float]
    ctr: float
    heart_height: float
    heart_tilt: float
    lung_darkness: float
    soft_tissue: float
    rib_spacing: float
    rotation: float
    female: bool


def generate_phantoms(
    out: Path,
    n: int = 400,
    task: Task = "multilabel",
    size: int = 256,
    seed: int = 0,
    progress: bool = True,
    marker: bool = False,
) -> Path:
    """Write ``n`` phantom images with labels, patient metadata, masks and NIH-style boxes into ``out``.

    ``multilabel``: ``images/`` + ``labels.csv`` (``labels`` pipe-separated, ``No Finding`` when none).
    ``multiclass``: one folder per class (``normal`` or one finding) + ``metadata.csv``.
    Both: ``masks/<stem>__<finding>.png``, ``masks/lungs/<stem>.png`` and ``BBox_List_2017.csv``, written
    last (it marks completion). ``marker``: each class's site stamps its films (see the module docstring).
    """
    if task not in TASKS:
        raise ConfigError(f"phantom task must be one of {TASKS}, not {task!r}")
    if marker and task != "multiclass":
        raise ConfigError("phantom markers stamp one class per site: use them with task multiclass")
    if n < 1:
        raise ConfigError(f"the number of phantoms must be at least 1 image, not {n!r}")
    if size < 64:
        raise ConfigError(f"the phantom size must be at least 64 pixels, not {size!r}")
    out = Path(out)
    (out / LUNG_MASKS).mkdir(parents=True, exist_ok=True)
    rows, boxes = [], []
    shots = _plan(n, task, seed)
    sites = _sites(shots, seed)
    for shot, site in tqdm(zip(shots, sites, strict=True), desc="phantoms", unit="img", disable=not progress, total=n):
        pixels, masks, lungs = _render(shot, seed, size)
        folder = "images" if task == "multilabel" else (shot.findings[0] if shot.findings else NORMAL)
        if marker:
            site = f"site-{folder}"
            _stamp(pixels, (NORMAL, *FINDINGS).index(folder))
        (out / folder).mkdir(exist_ok=True)
        write_atomic(out / folder / shot.name, _png(pixels))
        write_atomic(out / LUNG_MASKS / shot.name, _png(lungs.astype(np.uint8) * 255))
        for finding, mask in masks.items():
            write_atomic(out / "masks" / f"{Path(shot.name).stem}__{finding}.png", _png(mask.astype(np.uint8) * 255))
            boxes.append((shot.name, finding, *_bounding_box(mask)))
        labels = ("|".join(shot.findings) or NO_FINDING) if task == "multilabel" else folder
        rows.append((f"{folder}/{shot.name}", labels, f"P{shot.patient:05d}", shot.sex, shot.age, shot.view, site))
    label_column = "labels" if task == "multilabel" else "label"
    table = pd.DataFrame(rows, columns=["path", label_column, "patient_id", "sex", "age", "view", "source"])
    csv_name = "labels.csv" if task == "multilabel" else "metadata.csv"
    write_atomic(out / csv_name, table.to_csv(index=False, lineterminator="\n"))
    box_lines = [BOX_HEADER] + [f"{name},{finding},{x!r},{y!r},{w!r},{h!r}" for name, finding, x, y, w, h in boxes]
    write_atomic(out / BOX_FILE, "\n".join(box_lines) + "\n")
    log.info("wrote %d %s phantoms (%d boxes) to %s", n, task, len(boxes), out)
    return out


def _sites(shots: list[_Shot], seed: int) -> list[str]:
    """The site of each image: one per patient, drawn on a generator of its own (the images stay as they were)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(3,)))
    of_patient = rng.choice(SITES, size=shots[-1].patient + 1)
    return [str(of_patient[shot.patient]) for shot in shots]


def _stamp(pixels: np.ndarray, site: int) -> None:
    """Burn site ``site``'s marker into a corner of ``pixels`` (uint8, in place): a white square in corner
    ``site % 4``, two side by side from the fifth site on."""
    size = pixels.shape[0]
    side, offset = max(2, round(MARKER_SIZE * size)), max(1, round(MARKER_OFFSET * size))
    top = offset if site % 4 < 2 else size - offset - side
    for k in range(1 + site // 4):
        left = offset + k * (side + offset) if site % 2 == 0 else size - offset - side - k * (side + offset)
        pixels[top : top + side, left : left + side] = 255


def ensure_phantoms(out: Path, n: int, task: Task, size: int, seed: int) -> Path:
    """``out``, generated with these settings unless a complete set is there (its box list is written last)."""
    if not (Path(out) / BOX_FILE).exists():
        generate_phantoms(out, n=n, task=task, size=size, seed=seed, progress=False)
    return Path(out)


def load_phantom_masks(root: Path, image_name: str) -> dict[str, np.ndarray]:
    """The finding masks (finding -> bool array) of one phantom image, by file name; {} for a normal image."""
    root = Path(root)
    name = Path(image_name).name
    if not any(root.glob(f"*/{name}")) or not (root / "masks").is_dir():
        raise DataSourceError(f"{root}: no phantom image named {name!r} (with masks/ beside it)")
    stem = Path(name).stem
    masks = {}
    for finding in FINDINGS:
        path = root / "masks" / f"{stem}__{finding}.png"
        if path.exists():
            masks[finding] = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 127
    return masks


def _plan(n: int, task: Task, seed: int) -> list[_Shot]:
    """Patients, follow-ups, findings and metadata of every image, drawn in one sequence."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    counts, weights = zip(*_IMAGES_PER_PATIENT, strict=True)
    shots: list[_Shot] = []
    patient = 0
    while len(shots) < n:
        images = int(rng.choice(counts, p=weights))
        sex = "F" if rng.random() < 0.5 else "M"
        age = int(rng.integers(18, 90))
        for follow_up in range(min(images, n - len(shots))):
            if task == "multilabel":
                findings = tuple(f for f in FINDINGS if rng.random() < FINDING_RATE)
            else:
                choice = int(rng.integers(len(FINDINGS) + 1))
                findings = (FINDINGS[choice - 1],) if choice else ()
            view = "AP" if rng.random() < _AP_RATE else "PA"
            shots.append(_Shot(len(shots), patient, follow_up, findings, sex, age, view))
        patient += 1
    return shots


def _anatomy(rng: np.random.Generator) -> _Anatomy:
    top = rng.uniform(0.13, 0.18)
    base_right = top + rng.uniform(0.56, 0.64)  # the right hemidiaphragm (image left) sits higher
    half_width = rng.uniform(0.33, 0.39)
    return _Anatomy(
        cx=0.5 + rng.normal(0, 0.012),
        top=(top, top + rng.uniform(0.0, 0.02)),
        base=(base_right, base_right + rng.uniform(0.01, 0.04)),
        lateral=(half_width, half_width * rng.uniform(0.96, 1.03)),
        medial=(rng.uniform(0.06, 0.085), rng.uniform(0.065, 0.09)),
        dome=(rng.uniform(0.06, 0.1), rng.uniform(0.05, 0.09)),
        ctr=rng.uniform(0.40, 0.49),
        heart_height=rng.uniform(0.12, 0.145),
        heart_tilt=rng.uniform(8, 20),
        lung_darkness=rng.uniform(0.24, 0.32),
        soft_tissue=rng.uniform(0.40, 0.50),
        rib_spacing=rng.uniform(0.064, 0.074),
        rotation=rng.uniform(-3.5, 3.5),
        female=bool(rng.random() < 0.5),
    )


class _Canvas:
    """The layers of one image, in image-side units: tissue, lung air, what hides the air, vessel markings.

    The film is ``tissue - air * (1 - opacity) + markings * (1 - opacity) * visibility + density``: heart,
    mediastinum, fluid and consolidation are opacities that hide the lung's air and vessels.
    """

    def __init__(self, size: int):
        self.size = size
        self.y, self.x = np.mgrid[0:size, 0:size].astype(np.float32) / size
        self.tissue = np.zeros((size, size), np.float32)
        self.air = np.zeros((size, size), np.float32)
        self.opacity = np.zeros((size, size), np.float32)
        self.markings = np.zeros((size, size), np.float32)
        self.visibility = np.ones((size, size), np.float32)
        self.density = np.zeros((size, size), np.float32)

    def film(self) -> np.ndarray:
        clear = 1 - np.clip(self.opacity, 0, 1)
        return self.tissue - self.air * clear + self.markings * clear * self.visibility + self.density

    def opaque(self, layer: np.ndarray) -> None:
        """Add an opacity (0-1) that hides the air and vessels beneath it."""
        np.maximum(self.opacity, layer, out=self.opacity)

    def px(self, value: float) -> float:
        return value * self.size

    def blur(self, layer: np.ndarray, sigma: float) -> np.ndarray:
        """Gaussian blur with ``sigma`` in image-side units."""
        return cv2.GaussianBlur(layer.astype(np.float32), (0, 0), max(self.px(sigma), 0.3))

    def fill(self, points: np.ndarray) -> np.ndarray:
        """A bool mask of the polygon ``points``."""
        mask = np.zeros((self.size, self.size), np.uint8)
        cv2.fillPoly(mask, [np.round(points * self.size * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
        return mask.astype(bool)

    def stroke(self, layer: np.ndarray, points: np.ndarray, width: float, value: float = 1.0) -> None:
        """Draw a polyline of ``width`` onto ``layer``."""
        pts = np.round(points * self.size * 16).astype(np.int32)
        cv2.polylines(layer, [pts], False, value, max(1, round(self.px(width))), cv2.LINE_AA, shift=4)

    def ellipse(self, center: tuple[float, float], axes: tuple[float, float], angle: float) -> np.ndarray:
        """A bool mask of an ellipse (angle in degrees)."""
        mask = np.zeros((self.size, self.size), np.uint8)
        c = (round(center[0] * self.size * 16), round(center[1] * self.size * 16))
        a = (max(1, round(axes[0] * self.size * 16)), max(1, round(axes[1] * self.size * 16)))
        cv2.ellipse(mask, c, a, angle, 0, 360, 1, -1, cv2.LINE_8, shift=4)
        return mask.astype(bool)

    def noise(self, rng: np.random.Generator, cells: int) -> np.ndarray:
        """Smooth noise in [0, 1] with about ``cells`` features across the image."""
        coarse = rng.random((cells + 1, cells + 1)).astype(np.float32)
        return np.clip(cv2.resize(coarse, (self.size, self.size), interpolation=cv2.INTER_CUBIC), 0, 1)


def _render(shot: _Shot, seed: int, size: int) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Draw one image (uint8), the bool mask of each of its findings and that of its lung fields.

    The body comes from the patient's generator, so follow-ups share their anatomy; findings, positioning
    and film from the image's own.
    """
    body_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, shot.patient)))
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2, shot.index)))
    anatomy = _anatomy(body_rng)
    canvas = _Canvas(size)
    lungs = _draw_body(canvas, anatomy, body_rng)
    heart = _draw_heart(canvas, anatomy, enlarged="cardiomegaly" in shot.findings, rng=rng)
    free_lungs = [lung & ~heart for lung in lungs]
    masks = {"cardiomegaly": heart} if "cardiomegaly" in shot.findings else {}
    for finding in shot.findings:
        if finding != "cardiomegaly":
            side = int(rng.integers(2))
            masks[finding] = _FINDING_DRAWERS[finding](canvas, anatomy, lungs[side], free_lungs[side], side, rng)
    pixels, moved = _film(canvas, anatomy, canvas.film(), {**masks, "lungs": lungs[0] | lungs[1]}, rng)
    return pixels, {finding: mask for finding, mask in moved.items() if finding != "lungs"}, moved["lungs"]


def _lung_outline(anatomy: _Anatomy, side: int) -> np.ndarray:
    """Polygon of one lung: lateral wall, diaphragm dome with a sharp costophrenic angle, medial border."""
    sign = -1 if side == 0 else 1
    lateral = anatomy.cx + sign * anatomy.lateral[side]
    medial = anatomy.cx + sign * anatomy.medial[side]
    top, base, dome = anatomy.top[side], anatomy.base[side], anatomy.dome[side]
    apex = medial + (lateral - medial) * 0.42
    base_medial = base - 0.035
    theta = np.linspace(0, np.pi / 2, 28)
    wall = np.stack([apex + (lateral - apex) * np.sin(theta), base - (base - top) * np.cos(theta)], 1)
    s = np.linspace(0, 1, 20)[1:]
    diaphragm = np.stack(
        [lateral + (medial - lateral) * s, base + (base_medial - base) * s - dome * np.sin(np.pi * s)], 1
    )
    v = np.linspace(0, 1, 16)[1:-1]
    mediastinal = np.stack([medial + (apex - medial) * v**3, base_medial + (top - base_medial) * v], 1)
    return np.concatenate([wall, diaphragm, mediastinal])


def _draw_body(canvas: _Canvas, anatomy: _Anatomy, rng: np.random.Generator) -> list[np.ndarray]:
    """Soft tissue, lungs with vessel markings, mediastinum, spine, ribs and clavicles; returns the lung masks."""
    cx = anatomy.cx
    x, y = canvas.x, canvas.y
    shoulders = np.clip((y - 0.03) / 0.16, 0, 1)
    half_width = 0.1 + 0.36 * shoulders**0.6 * (3 - 2 * shoulders)
    body = canvas.blur(np.abs(x - cx) < half_width, 0.01)
    tissue = anatomy.soft_tissue * (0.9 + 0.2 * y) + 0.05 * (canvas.noise(rng, 4) - 0.5)
    canvas.tissue += 0.03 + body * (tissue - 0.03)
    if anatomy.female:
        for side in (0, 1):
            sign = -1 if side == 0 else 1
            breast = canvas.ellipse((cx + sign * 0.24, anatomy.base[side] - 0.05), (0.15, 0.1), 0)
            canvas.tissue += 0.06 * canvas.blur(breast, 0.03)

    lungs = [canvas.fill(_lung_outline(anatomy, side)) for side in (0, 1)]
    lung_soft = canvas.blur(lungs[0] | lungs[1], 0.005)
    canvas.air = lung_soft * anatomy.lung_darkness * (0.85 + 0.3 * canvas.noise(rng, 5))
    for side in (0, 1):
        sign = -1 if side == 0 else 1
        hilum = np.array([cx + sign * 0.1, (anatomy.top[side] + anatomy.base[side]) / 2 - 0.04])
        for heading in np.deg2rad((-70, -20, 25, 60)):  # outward from the hilum; negative is upward
            angle = math.atan2(math.sin(heading), sign * math.cos(heading))
            _vessel(canvas, hilum, angle, 0.11, 0.011, 4, rng)
    canvas.markings = 0.075 * canvas.blur(canvas.markings, 0.002) * lung_soft

    top = min(anatomy.top)
    low = (anatomy.base[0] + anatomy.base[1]) / 2 - 0.1
    outline = np.array([[cx - 0.065, 0], [cx + 0.065, 0], [cx + 0.07, low], [cx - 0.075, low]])
    mediastinum = canvas.fill(outline) | canvas.ellipse((cx + 0.06, anatomy.top[1] + 0.13), (0.04, 0.035), 0)
    mediastinum_soft = canvas.blur(mediastinum, 0.008)
    canvas.opaque(mediastinum_soft)
    canvas.density += 0.05 * mediastinum_soft
    trachea = (np.abs(x - cx - 0.004) < 0.018) & (y < top + 0.2)
    canvas.density -= 0.07 * canvas.blur(trachea, 0.005) * np.clip((top + 0.2 - y) / 0.05, 0, 1)

    spine = canvas.blur(np.abs(x - cx) < 0.04, 0.005)
    vertebrae = 0.7 + 0.3 * np.cos(np.pi * (y - anatomy.top[0]) / (anatomy.rib_spacing * 0.9)) ** 2
    canvas.tissue += 0.06 * spine * vertebrae * body

    bones = np.zeros_like(canvas.tissue)
    u = np.linspace(0, 1, 24)
    for side in (0, 1):
        sign = -1 if side == 0 else 1
        reach = anatomy.lateral[side] + 0.03
        for i in range(10):
            y0 = anatomy.top[side] - 0.035 + i * anatomy.rib_spacing + rng.normal(0, 0.003)
            arch = 0.045 * np.sin(0.85 * np.pi * u) - (0.08 + 0.01 * i) * u**2
            posterior = np.stack([cx + sign * (0.035 + u * reach), y0 - arch], 1)
            canvas.stroke(bones, posterior, 0.015)
            end = posterior[-1]
            anterior = np.stack([end[0] - sign * u * reach * 0.6, end[1] + 0.01 + 0.11 * u - 0.04 * u**2], 1)
            canvas.stroke(bones, anterior, 0.012, 0.5)
        clavicle = np.array(
            [[cx + sign * 0.05, top + 0.01], [cx + sign * 0.2, top - 0.04], [cx + sign * 0.38, top - 0.05]]
        )
        canvas.stroke(bones, clavicle, 0.022, 1.5)
    canvas.tissue += 0.08 * canvas.blur(bones, 0.003) * body * (0.5 + 0.5 * lung_soft)
    return lungs


def _vessel(
    canvas: _Canvas, start: np.ndarray, angle: float, length: float, width: float, depth: int, rng: np.random.Generator
) -> None:
    """A branching vessel: a short segment, then two thinner branches."""
    angle += rng.normal(0, 0.15)
    end = start + length * np.array([np.cos(angle), np.sin(angle)])
    canvas.stroke(canvas.markings, np.stack([start, end]), width)
    if depth > 1:
        for turn in (-1, 1):
            branch = angle + turn * rng.uniform(0.25, 0.6)
            _vessel(canvas, end, branch, length * rng.uniform(0.6, 0.8), width * 0.7, depth - 1, rng)


def _draw_heart(canvas: _Canvas, anatomy: _Anatomy, enlarged: bool, rng: np.random.Generator) -> np.ndarray:
    """The heart shadow, its width set by the cardiothoracic ratio (~0.45 normal, 0.58-0.68 enlarged)."""
    thorax = anatomy.lateral[0] + anatomy.lateral[1]
    ctr = rng.uniform(0.58, 0.68) if enlarged else anatomy.ctr + rng.normal(0, 0.008)
    half_width = ctr * thorax / 2
    center_x = anatomy.cx + 0.36 * half_width  # two thirds of the heart lie on the patient's left
    half_height = anatomy.heart_height * (1.12 if enlarged else 1.0)
    tilt = np.deg2rad(anatomy.heart_tilt)
    # The tilted ellipse's horizontal extent must equal the heart width: solve for its long axis.
    axis = math.sqrt(max(half_width**2 - (half_height * math.sin(tilt)) ** 2, 1e-4)) / math.cos(tilt)
    center_y = (anatomy.base[0] + anatomy.base[1]) / 2 - 0.07
    heart = canvas.ellipse((center_x, center_y), (axis, half_height), anatomy.heart_tilt)
    canvas.opaque(canvas.blur(heart, 0.005))
    return heart


def _pick_point(inside: np.ndarray, margin: float, rng: np.random.Generator) -> tuple[float, float]:
    """A random point at least ``margin`` pixels inside ``inside`` (as deep as possible if none is)."""
    depth = cv2.distanceTransform(inside.astype(np.uint8), cv2.DIST_L2, 3)
    ys, xs = np.nonzero(depth > min(margin, depth.max() * 0.8))
    k = int(rng.integers(len(ys)))
    return (xs[k] + 0.5) / inside.shape[1], (ys[k] + 0.5) / inside.shape[0]


def _nodule(
    canvas: _Canvas, anatomy: _Anatomy, lung: np.ndarray, free: np.ndarray, side: int, rng: np.random.Generator
) -> np.ndarray:
    """A small round dense opacity, radius 3.5-6.5% of the image side."""
    radius = rng.uniform(0.035, 0.065)
    center = _pick_point(free, canvas.px(radius) * 1.3, rng)
    axes = (radius * rng.uniform(0.88, 1.12), radius * rng.uniform(0.88, 1.12))
    nodule = canvas.ellipse(center, axes, rng.uniform(0, 180))
    soft = canvas.blur(nodule, radius * 0.2)
    canvas.opaque(rng.uniform(0.45, 0.75) * soft * (0.85 + 0.3 * canvas.noise(rng, 24)))
    canvas.density += 0.02 * soft
    return nodule


def _effusion(
    canvas: _Canvas, anatomy: _Anatomy, lung: np.ndarray, free: np.ndarray, side: int, rng: np.random.Generator
) -> np.ndarray:
    """Fluid at the lung base: a meniscus rising along the lateral wall, blunting the costophrenic angle."""
    sign = -1 if side == 0 else 1
    height = (anatomy.base[side] - anatomy.top[side]) * rng.uniform(0.12, 0.25)
    lateral_share = np.clip(sign * (canvas.x - anatomy.cx) / anatomy.lateral[side], 0, 1)
    surface = anatomy.base[side] - height - rng.uniform(0.03, 0.07) * lateral_share**2
    depth = canvas.y - surface
    fluid = lung & (depth > 0)
    layer = canvas.blur(lung, 0.004) * np.clip(depth / 0.015, 0, 1)
    canvas.opaque(rng.uniform(0.7, 0.95) * layer)
    canvas.density += 0.02 * layer
    return fluid


def _consolidation(
    canvas: _Canvas, anatomy: _Anatomy, lung: np.ndarray, free: np.ndarray, side: int, rng: np.random.Generator
) -> np.ndarray:
    """A patchy, irregular opacity inside one lung."""
    for _ in range(8):
        radii = (rng.uniform(0.07, 0.12), rng.uniform(0.06, 0.11))
        center = _pick_point(free, canvas.px(min(radii)) * 0.8, rng)
        distance = np.sqrt(((canvas.x - center[0]) / radii[0]) ** 2 + ((canvas.y - center[1]) / radii[1]) ** 2)
        patch = free & (1 - distance + 0.6 * (canvas.noise(rng, 14) - 0.5) > 0.2)
        if patch.sum() >= (0.05 * canvas.size) ** 2:
            break
    texture = 0.55 + 0.9 * canvas.noise(rng, 30)
    canvas.opaque(rng.uniform(0.45, 0.7) * canvas.blur(patch, 0.008) * texture)
    return patch


def _pneumothorax(
    canvas: _Canvas, anatomy: _Anatomy, lung: np.ndarray, free: np.ndarray, side: int, rng: np.random.Generator
) -> np.ndarray:
    """Air between chest wall and a visible pleural line at the apex and lateral edge, without lung markings."""
    sign = -1 if side == 0 else 1
    to_wall = cv2.distanceTransform(lung.astype(np.uint8), cv2.DIST_L2, 3) / canvas.size
    top, base = anatomy.top[side], anatomy.base[side]
    lowest = top + (base - top) * rng.uniform(0.4, 0.7)
    width = rng.uniform(0.045, 0.08) * np.clip((lowest - canvas.y) / 0.12, 0, 1)
    lateral_share = sign * (canvas.x - anatomy.cx) / anatomy.lateral[side]
    sector = (lateral_share > 0.45) | (canvas.y < top + 0.1)
    air = lung & sector & (to_wall < width)
    pleura = lung & sector & (to_wall >= width) & (to_wall < width + 1.6 / canvas.size) & (width > 0.01)
    soft = canvas.blur(air, 0.003)
    canvas.visibility *= 1 - soft
    canvas.density -= rng.uniform(0.04, 0.07) * soft
    canvas.density += rng.uniform(0.07, 0.11) * canvas.blur(pleura, 0.0015)
    return air


_FINDING_DRAWERS: dict[str, Callable[..., np.ndarray]] = {
    "nodule": _nodule,
    "effusion": _effusion,
    "consolidation": _consolidation,
    "pneumothorax": _pneumothorax,
}


def _film(
    canvas: _Canvas, anatomy: _Anatomy, image: np.ndarray, masks: dict[str, np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Positioning (rotation, shift), exposure, blur and film grain; the masks move with the image."""
    size = canvas.size
    angle = anatomy.rotation + rng.normal(0, 0.8)
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), angle, rng.uniform(0.97, 1.03))
    matrix[:, 2] += rng.normal(0, 0.012, 2) * size
    image = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    moved = {
        finding: cv2.warpAffine(mask.astype(np.uint8), matrix, (size, size), flags=cv2.INTER_NEAREST) > 0
        for finding, mask in masks.items()
    }
    image = canvas.blur(image, rng.uniform(0.0015, 0.004))
    image = np.clip(image * rng.uniform(0.9, 1.1) + rng.normal(0, 0.03), 0, 1) ** rng.uniform(0.85, 1.15)
    grain = rng.normal(0, rng.uniform(0.008, 0.018), image.shape).astype(np.float32)
    image = image + grain + 0.03 * (canvas.noise(rng, 8) - 0.5)
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), moved


def _bounding_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """x, y, w, h in pixels of a non-empty mask, as the NIH box list gives them."""
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)


def _png(pixels: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, _PNG_LEVEL])
    if not ok:  # pragma: no cover - encoding a uint8 array cannot fail short of memory
        raise RuntimeError("PNG encoding failed")
    return encoded.tobytes()
