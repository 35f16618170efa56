"""Per-study reports: zones of heatmap peaks, sentences from measured values, the CLI, PDF, real images."""

from __future__ import annotations

import html
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import CHROMIUM_FLAGS, face_probe, tiny_run
from PIL import Image

from medlens.cli import main
from medlens.config import load_config
from medlens.data.phantoms import load_phantom_masks
from medlens.data.readers import read_image
from medlens.explain.cam import CamExplainer
from medlens.inference import NetworkModel, load_model
from medlens.jobs.predict import record_views, write_reports, write_study_reports
from medlens.jobs.train import train
from medlens.reports.study import (
    GENETICIST_NOTE,
    NOT_RECORDED,
    RESEARCH_USE,
    FindingFacts,
    Study,
    Zone,
    finding_sentence,
    heatmap_zone,
    study_of,
)
from medlens.reports.study_page import find_chromium, render_study

TINY = tiny_run("data.image_size=64", "data.phantoms.size=128", "train.epochs=1")
SCREENSHOT = Path("/tmp/medlens-study-report.png")
SENTENCE = re.compile(r'<li data-finding="([^"]+)">([^<]+)</li>')
ZONE = re.compile(
    r"strongest in the (upper|middle|lower) (left|central|right) zone of the image(?: \(the patient's (\w+)\))?"
)
THIRDS = (("upper", "middle", "lower"), ("left", "central", "right"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A one-epoch multi-label phantom run; its best/ manifest records the validation operating points."""
    folder = tmp_path_factory.mktemp("study") / "run"
    train(load_config(None, TINY), folder, progress=False)
    return folder


@pytest.fixture(scope="module")
def predictor(run) -> NetworkModel:
    return load_model(run)


def _sentences(page: str) -> dict[str, str]:
    """Finding -> its sentence, from a report's summary."""
    return {html.unescape(label): html.unescape(text) for label, text in SENTENCE.findall(page)}


def _third(fraction: float) -> int:
    return min(int(fraction * 3), 2)


def _expected_zone(heatmap: np.ndarray) -> tuple[str, str]:
    """The thirds holding a map's maximum, worked out here independently of heatmap_zone."""
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return THIRDS[0][_third((row + 0.5) / heatmap.shape[0])], THIRDS[1][_third((col + 0.5) / heatmap.shape[1])]


def _blob(shape: tuple[int, int], center: tuple[float, float], sigma: float = 4.0) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return np.exp(-((rows - center[0]) ** 2 + (cols - center[1]) ** 2) / (2 * sigma**2)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- zones


@pytest.mark.parametrize("vertical", range(3))
@pytest.mark.parametrize("horizontal", range(3))
@pytest.mark.parametrize("shape", [(64, 64), (30, 90)])
def test_the_zone_is_the_third_each_way_holding_the_peak(vertical, horizontal, shape):
    center = ((vertical + 0.5) * shape[0] / 3, (horizontal + 0.5) * shape[1] / 3)
    zone = heatmap_zone(_blob(shape, center, sigma=2.0) + 0.1 * _blob(shape, (0, 0), sigma=20.0))
    assert (zone.vertical, zone.horizontal) == (THIRDS[0][vertical], THIRDS[1][horizontal])
    assert abs(zone.peak[0] - center[0] / shape[0]) < 1.5 / shape[0]
    assert abs(zone.peak[1] - center[1] / shape[1]) < 1.5 / shape[1]


def test_a_flat_map_has_no_zone_and_a_bad_one_says_what_is_expected():
    assert heatmap_zone(np.zeros((7, 7), np.float32)) is None
    assert heatmap_zone(np.full((7, 7), 0.3, np.float32)) is None
    with pytest.raises(ValueError, match="2-D"):
        heatmap_zone(np.zeros((2, 7, 7)))


@pytest.mark.parametrize(
    ("horizontal", "view", "expected"),
    [
        ("right", "PA", "the lower right zone of the image (the patient's left)"),
        ("left", "AP", "the lower left zone of the image (the patient's right)"),
        ("central", "PA", "the lower central zone of the image"),
        ("right", "LL", "the lower right zone of the image"),
        ("right", None, "the lower right zone of the image"),
    ],
)
def test_the_patient_side_is_stated_for_frontal_views_only(horizontal, view, expected):
    assert Zone("lower", horizontal, (0.8, 0.5)).describe(view) == expected


def test_a_positive_finding_reads_as_the_template_with_measured_numbers():
    finding = FindingFacts(
        "Pleural_Thickening", 0.8234, positive=True, threshold=0.4071, zone=Zone("lower", "right", (0.8, 0.9))
    )
    assert finding_sentence(finding, "PA", "multilabel") == (
        "Signs consistent with Pleural Thickening, strongest in the lower right zone of the image (the patient's "
        "left); the model's probability is 0.82, above its threshold of 0.41."
    )
    top_class = FindingFacts("covid19", 0.61, positive=True)
    assert (
        finding_sentence(top_class, None, "multiclass") == "The most probable class is covid19, with probability 0.61."
    )


def test_a_multiclass_study_ranks_every_class_and_names_the_top_one():
    findings = [
        FindingFacts(label, p, positive=i == 0) for i, (label, p) in enumerate([("b", 0.6), ("a", 0.3), ("c", 0.1)])
    ]
    page = render_study(
        Study("chest-xray", "multiclass", findings, _png(np.zeros((8, 8))), [("model", "m")], "gradcam")
    )
    assert "The most probable class is b, with probability 0.60." in page
    assert re.findall(r'<tr[^>]*data-label="(\w)"', page) == ["b", "a", "c"]
    assert "All classes, ranked" in page and RESEARCH_USE in page


def test_a_multiclass_checkpoint_reports_its_top_class_with_a_heatmap_and_the_ranking(tmp_path):
    run = tmp_path / "run"
    train(load_config(None, [*TINY, "data.phantoms.task=multiclass", "data.phantoms.n=40"]), run, progress=False)
    predictor = load_model(run)
    image = sorted((run / "phantoms").rglob("*.png"))[0]
    study = study_of(predictor, image.read_bytes(), xray_guard=False)
    page = render_study(study)
    probs = predictor.predict_images([predictor.read(image)])[0]
    ranked = [predictor.labels[j] for j in np.argsort(-probs, kind="stable")]
    assert re.findall(r'<tr[^>]*data-label="(\w+)"', page) == ranked
    assert list(_sentences(page)) == [ranked[0]] == predictor.positives(probs)
    assert _sentences(page)[ranked[0]].startswith(f"The most probable class is {ranked[0]}, with probability ")
    assert [f.label for f in study.findings if f.heatmap_png] == [ranked[0]] and "threshold" not in page


# ---------------------------------------------------------------------------------------------- phantoms


def test_the_run_records_validation_sensitivity_and_specificity_per_label(predictor):
    points = predictor.manifest["operating_points"]
    assert list(points) == predictor.labels
    for point in points.values():
        assert point["n_known"] > 0
        for key in ("sensitivity", "specificity"):
            assert point[key] is None or 0.0 <= point[key] <= 1.0


class _LesionExplainer:
    """Stands in for a CAM: a blob over the lesion centre of the image being reported, for every finding."""

    method = "lesion"

    def __init__(self, center: tuple[float, float], size: int):
        self.heatmap = _blob((size, size), (center[0] * size, center[1] * size))

    def __call__(self, x, target: int) -> np.ndarray:
        return self.heatmap


def test_zone_text_names_where_phantom_lesions_are(run, predictor):
    """End to end on phantoms with known lesions: every finding's sentence names the lesion's zone and side."""
    root = run / "phantoms"
    table = pd.read_csv(root / "labels.csv")
    everything = NetworkModel(predictor.network, {**predictor.manifest, "thresholds": [0.0] * len(predictor.labels)})
    checked = set()
    for row in table.itertuples():
        for finding, mask in load_phantom_masks(root, row.path).items():
            ys, xs = np.nonzero(mask)
            center = ((ys.mean() + 0.5) / mask.shape[0], (xs.mean() + 0.5) / mask.shape[1])
            expected = (THIRDS[0][_third(center[0])], THIRDS[1][_third(center[1])])
            if expected in checked or finding == "cardiomegaly":
                continue
            data = (root / row.path).read_bytes()
            everything._explainer_for = lambda method, c=center: _LesionExplainer(c, 64)
            study = study_of(everything, data, xray_guard=False, view=row.view)
            sentences = _sentences(render_study(study))
            assert set(sentences) == set(predictor.labels)
            for sentence in sentences.values():
                vertical, horizontal, side = ZONE.search(sentence).groups()
                assert (vertical, horizontal) == expected, (row.path, finding, sentence)
                assert side == {"left": "right", "right": "left", "central": None}[horizontal]
            checked.add(expected)
    assert len(checked) >= 5, f"phantom lesions covered only the zones {checked}"


def test_the_cli_writes_a_report_per_image_and_an_index(run, predictor, tmp_path, capsys):
    images = sorted((run / "phantoms" / "images").glob("*.png"))[:4]
    out = tmp_path / "reports"
    argv = ["predict", str(run), *map(str, images), "--out", str(tmp_path / "p.csv"), "--report", str(out)]
    assert main([*argv, "--no-pdf", "--patient-label", "Study <7>", "--view", "pa"]) == 0
    assert f"reports: {out / 'index.html'}" in capsys.readouterr().out
    index = (out / "index.html").read_text()
    csv = pd.read_csv(tmp_path / "p.csv", dtype=str).fillna("")
    with CamExplainer(predictor.network) as explainer:
        for image, listed in zip(images, csv.itertuples(), strict=True):
            page = (out / f"{image.stem}.html").read_text()
            assert f'href="{image.stem}.html"' in index and not (out / f"{image.stem}.pdf").exists()
            sentences = _sentences(page)
            assert set(sentences) == set(listed.positives.split("|")) - {""}
            assert "patient: Study &lt;7&gt;" in page and "View: PA." in page
            x = predictor.to_tensor([predictor.read(image)])
            for finding, sentence in sentences.items():
                heatmap = explainer(x, predictor.labels.index(finding))
                named = ZONE.search(sentence)
                if named is None:  # a flat map names no zone
                    assert heatmap.max() <= heatmap.min()
                    continue
                assert named.groups()[:2] == _expected_zone(heatmap), (image.name, finding)


def test_a_checkpoint_without_operating_points_says_not_recorded(run, predictor, tmp_path):
    manifest = {k: v for k, v in predictor.manifest.items() if k != "operating_points"}
    bare = NetworkModel(predictor.network, {**manifest, "thresholds": [0.0] * len(predictor.labels)})
    image = sorted((run / "phantoms" / "images").glob("*.png"))[0]
    page = render_study(study_of(bare, image.read_bytes(), xray_guard=False))
    assert page.count(f"<td>{NOT_RECORDED}</td>") == len(predictor.labels)
    assert "View: not known, so sides are the image&#x27;s only." in page and "(the patient" not in page


def test_each_report_takes_its_view_from_the_record_else_the_option(run, tmp_path):
    table = pd.read_csv(run / "phantoms" / "labels.csv")
    seen: dict[str, str | None] = {}

    def study_of(data: bytes, name: str, view: str | None) -> Study:
        seen[name] = view
        return Study("chest-xray", "multilabel", [FindingFacts("a", 0.1, False, 0.5)], _png(np.zeros((4, 4))), [], "-")

    write_reports(study_of, [run / "phantoms" / "labels.csv"], tmp_path / "a", view="LL", pdf=False, progress=False)
    assert seen == {Path(p).name: v for p, v in zip(table["path"], table["view"], strict=True)}
    seen.clear()
    write_reports(study_of, [run / "phantoms" / "images"], tmp_path / "b", view="LL", pdf=False, progress=False)
    assert set(seen.values()) == {"LL"} and len(seen) == len(table)
    assert len(re.findall(r'href="ph\d+_\d+\.html"', (tmp_path / "b" / "index.html").read_text())) == len(table)


@pytest.mark.shared
def test_nih_views_come_from_its_metadata_csv(shared_data):
    views = record_views([shared_data / "nih14" / "Data_Entry_2017_v2020.csv"])
    assert len(views) == 219 and set(views.values()) == {"AP", "PA"}


# ---------------------------------------------------------------------------------------------- real images


@pytest.fixture(scope="module")
def real_reports(run, predictor, shared_data, tmp_path_factory) -> tuple[Path, list[Path]]:
    """Reports (with PDFs where Chromium is) on real NIH films (boxed ones first) and two cxr4 images."""
    nih = shared_data / "nih14"
    boxed = pd.read_csv(nih / "BBox_List_2017.csv")["Image Index"].unique()[:4]
    images = [nih / "images" / name for name in boxed]
    images += (
        sorted((shared_data / "cxr4" / "normal").iterdir())[:1]
        + sorted((shared_data / "cxr4" / "covid19").iterdir())[:1]
    )
    out = tmp_path_factory.mktemp("real-reports")
    write_study_reports(predictor, images, out, progress=False)
    return out, images


@pytest.mark.shared
def test_real_reports_name_exactly_the_findings_above_threshold(real_reports, predictor):
    out, images = real_reports
    with CamExplainer(predictor.network) as explainer:
        for image in images:
            page = (out / f"{image.stem}.html").read_text()
            pixels = read_image(image)
            x = predictor.to_tensor([pixels])
            positives = predictor.positives(predictor.probabilities(predictor.forward(x).numpy())[0])
            if "does not look like a chest X-ray" in page:  # the guard withholds findings
                assert _sentences(page) == {} and 'id="findings"' not in page
                continue
            sentences = _sentences(page)
            assert set(sentences) == set(positives), image.name
            for finding, sentence in sentences.items():
                heatmap = explainer(x, predictor.labels.index(finding))
                named = ZONE.search(sentence)
                assert named is None or named.groups()[:2] == _expected_zone(heatmap)
            assert RESEARCH_USE in page and image.stem not in page  # nothing from the file name


@pytest.mark.shared
@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (scripts/setup-system.sh installs it)")
def test_a_real_report_renders_in_chromium_and_prints_to_pdf(real_reports, tmp_path):
    out, images = real_reports
    page = out / f"{images[0].stem}.html"
    assert (out / f"{images[0].stem}.pdf").read_bytes().startswith(b"%PDF")
    command = [
        find_chromium(),
        *CHROMIUM_FLAGS,
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={tmp_path / 'shot.png'}",
        "--window-size=1100,1600",
        page.as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and (tmp_path / "shot.png").exists(), result.stderr[-2000:]
    shutil.copy(tmp_path / "shot.png", SCREENSHOT)  # to look at
    pixels = np.asarray(Image.open(tmp_path / "shot.png").convert("L"), dtype=np.float64)
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.01, "the page did not render"
    index = (out / "index.html").read_text()
    assert all(f'href="{image.stem}.html"' in index and f'href="{image.stem}.pdf"' in index for image in images)


@pytest.mark.shared
@pytest.mark.slow
def test_face_reports_rank_five_syndromes_for_a_geneticist_from_the_cli_and_the_app(shared_data, tmp_path):
    pytest.importorskip("dlib", reason="face checkpoints need the faces extra: pip install 'medlens[faces]'")
    from fastapi.testclient import TestClient

    from medlens.serve.app import create_app

    people = sorted(p for p in (shared_data / "faces-lfw15").iterdir() if p.is_dir())[:6]
    for person in people:  # symlinks: nothing from ../shared is copied
        (tmp_path / "photos" / person.name).mkdir(parents=True)
        for photo in sorted(person.glob("*.jpg"))[:4]:
            (tmp_path / "photos" / person.name / photo.name).symlink_to(photo)
    train(load_config(None, face_probe(tmp_path / "photos", "model.probe=logreg")), tmp_path / "run", progress=False)
    photo = sorted(people[0].glob("*.jpg"))[-1]
    no_face = sorted((shared_data / "face-probes" / "noface").iterdir())[0]
    out = tmp_path / "reports"
    predictor = load_model(tmp_path / "run")
    write_study_reports(predictor, [photo, no_face], out, pdf=False, progress=False)
    page = (out / f"{photo.stem}.html").read_text()
    assert GENETICIST_NOTE in page and "The 5 most probable syndromes" in page and "occlusion heatmap" in page
    probs = predictor.predict_images([predictor.read(photo)])[0]
    ranked = sorted(zip(predictor.labels, probs, strict=True), key=lambda item: -item[1])
    assert re.findall(r'<tr[^>]*data-label="([^"]+)"', page) == [label for label, _ in ranked[:5]]
    empty = (out / f"{no_face.stem}.html").read_text()
    assert "no face found" in empty and no_face.name not in empty and 'id="findings"' not in empty

    with TestClient(create_app(tmp_path / "run")) as client:
        served = client.post("/report", files={"file": ("face.jpg", photo.read_bytes())})
        refused = client.post("/report", files={"file": ("x.jpg", no_face.read_bytes())})
    assert served.status_code == 200 and GENETICIST_NOTE in served.text
    assert re.findall(r'<tr[^>]*data-label="([^"]+)"', served.text) == [label for label, _ in ranked[:5]]
    assert refused.status_code == 422 and refused.json()["error"] == "no_face"


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
