"""A face probe (dlib embeddings + a head) behind the same app: top-k classes, occlusion heatmaps, no X-ray guard."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import face_probe
from PIL import Image

from medlens.config import load_config
from medlens.jobs.train import train
from medlens.serve.app import create_app
from medlens.serve.background import serve_in_thread

PEOPLE = ("Tony_Blair", "Serena_Williams", "Colin_Powell")


@pytest.fixture(scope="module")
def face_run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A logistic head on the first 6 photos of each of PEOPLE."""
    pytest.importorskip("dlib", reason="face checkpoints need the faces extra: pip install 'medlens[faces]'")
    root = tmp_path_factory.mktemp("faces")
    for person in PEOPLE:  # symlinks: nothing from ../shared is copied
        (root / "photos" / person).mkdir(parents=True)
        for photo in sorted((shared_data / "faces-lfw15" / person).glob("*.jpg"))[:6]:
            (root / "photos" / person / photo.name).symlink_to(photo)
    train(load_config(None, face_probe(root / "photos", "model.probe=logreg")), root / "run", progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def face_client(face_run: Path):
    with TestClient(create_app(face_run)) as client:
        yield client


@pytest.mark.shared
@pytest.mark.slow
def test_face_checkpoint_answers_top_k_without_the_xray_guard(face_client: TestClient, shared_data: Path):
    info = face_client.get("/model").json()
    assert info["kind"] == "probe" and info["inputs"] == "face-photo" and sorted(info["labels"]) == sorted(PEOPLE)
    assert info["ood_guard"] is False and info["input"] is None and info["cam_methods"] == ["occlusion"]
    photo = sorted((shared_data / "faces-lfw15" / "Serena_Williams").glob("*.jpg"))[-1].read_bytes()
    body = face_client.post("/predict", files={"file": ("face.jpg", photo)}).json()
    assert body["kind"] == "probe" and body["inputs"] == "face-photo" and body["ood"] is None
    assert [f["label"] for f in body["top_k"]] == [f["label"] for f in body["findings"]][:3]
    assert body["positives"] == [body["findings"][0]["label"]] and body["findings"][0]["threshold"] is None
    (heatmap,) = body["heatmaps"]
    assert heatmap["label"] == body["positives"][0] and heatmap["method"] == "occlusion"
    assert Image.open(io.BytesIO(base64.b64decode(heatmap["png_base64"]))).size == (heatmap["width"], heatmap["height"])
    chosen = face_client.post("/predict?labels=Colin_Powell", files={"file": ("face.jpg", photo)}).json()
    assert [h["label"] for h in chosen["heatmaps"]] == ["Colin_Powell"]
    xray = sorted((shared_data / "nih14" / "images").glob("*.png"))[0].read_bytes()
    response = face_client.post("/predict", files={"file": ("film.png", xray)})
    assert response.status_code == 422 and response.json()["error"] == "no_face"
    assert "no face found" in response.json()["detail"]


@pytest.mark.shared
@pytest.mark.slow
def test_face_report_keeps_the_server_pixel_limit(face_client: TestClient):
    huge = io.BytesIO()
    Image.new("RGB", (4100, 4100)).save(huge, "JPEG")  # 16.8 M pixels: over the server's 16 M, under the reader's
    for route in ("/predict", "/report"):
        response = face_client.post(route, files={"file": ("face.jpg", huge.getvalue())})
        assert response.status_code == 422 and response.json()["error"] == "unreadable_image", route
        assert "16,000,000" in response.json()["detail"], route


@pytest.mark.shared
@pytest.mark.slow
def test_the_page_shows_a_face_checkpoints_top_k_and_its_heatmap(browser, face_run: Path, shared_data, tmp_path):
    person = PEOPLE[1]
    photo = sorted((shared_data / "faces-lfw15" / person).glob("*.jpg"))[-1]  # not one the head was trained on
    with serve_in_thread(create_app(face_run), log_level="warning") as base:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(base)
        page.wait_for_selector("#model-name:not(:empty)")
        page.set_input_files("#file", str(photo))
        page.wait_for_selector("#heatmap:not([hidden])", timeout=60_000)
        assert page.text_content("#findings-title") == f"Most probable 3 of {len(PEOPLE)} classes"
        rows = page.locator("#findings .bar .label").all_text_contents()
        shown = [float(v.rstrip("%")) for v in page.locator("#findings .bar .value").all_text_contents()]
        assert sorted(rows) == sorted(PEOPLE) and rows[0] == person and shown == sorted(shown, reverse=True)
        assert page.locator("#findings .threshold").count() == 0  # classes, not findings with thresholds
        assert page.get_attribute("#heatmap", "src").startswith("data:image/png;base64,")
        assert page.is_hidden("#ood") and page.is_hidden("#error")
        page.screenshot(path=str(tmp_path / "face-checkpoint.png"), full_page=True)
