"""The HTTP API on a tiny checkpoint: answers, heatmaps, auth, every bad input as 4xx JSON, privacy."""

from __future__ import annotations

import argparse
import base64
import io
import logging
import os
import socket
import tempfile
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from medlens.data.readers import read_image
from medlens.errors import ConfigError
from medlens.inference import Predictor
from medlens.ood import expects_chest_xrays
from medlens.serve import app as serve_app
from medlens.serve.app import create_app
from medlens.serve.cli import add_parser

CANARIES = ("CANARY^SECRET", "CANARY", "SECRET", "CANARY-ID-4711", "19010203")


def _post(client: TestClient, data: bytes, query: str = "", name: str = "image", headers: dict | None = None):
    return client.post(f"/predict{query}", files={"file": (name, data, "application/octet-stream")}, headers=headers)


def _error(response: httpx.Response, status: int, code: str, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and body["error"] == code, body
    for word in words:
        assert word in body["detail"], body


@pytest.fixture(scope="session")
def xray_pixels(xray_png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(xray_png)).convert("L"))


def test_health_and_model_card(client: TestClient, run_dir):
    assert client.get("/health").json() == {"status": "ok", "model_loaded": True}
    info = client.get("/model").json()
    predictor = Predictor.from_checkpoint(run_dir)
    assert info["kind"] == "classifier" and info["task"] == "multilabel"
    assert info["labels"] == predictor.labels
    assert info["thresholds"] == pytest.approx(predictor.thresholds)
    assert info["input"] == {"image_size": 64, "channels": 1, "mean": predictor.mean, "std": predictor.std}
    card = info["card"]
    assert card["name"] == "tiny" and card["created"] and "torch" in card["versions"]
    assert {"val_loss", "val_auc"} <= set(card["metrics"])  # undefined metrics (NaN) arrive as null
    assert "gradcam" in info["cam_methods"] and info["ood_guard"] is True
    assert info["limits"]["max_upload_bytes"] == 32 * 1024 * 1024
    assert "not for diagnosis" in info["notice"]


@pytest.mark.parametrize("fmt", ["png", "jpeg", "dicom"])
def test_predict_each_format(client: TestClient, xray_png, xray_pixels, encode, make_dicom, fmt):
    data = {"png": xray_png, "jpeg": encode(xray_pixels, "JPEG"), "dicom": make_dicom(xray_pixels)}[fmt]
    response = _post(client, data)
    assert response.status_code == 200, response.text
    body = response.json()
    labels = client.get("/model").json()["labels"]
    findings = body["findings"]
    assert sorted(f["label"] for f in findings) == sorted(labels)
    assert [f["probability"] for f in findings] == sorted((f["probability"] for f in findings), reverse=True)
    assert all(f["positive"] == (f["probability"] >= f["threshold"]) for f in findings)
    assert body["positives"] == [f["label"] for f in findings if f["positive"]]
    assert body["top_k"] == findings[:3]
    assert body["image"]["format"] == fmt and (body["image"]["width"], body["image"]["height"]) == (128, 128)
    assert body["ood"]["flag"] is False and 0.0 <= body["ood"]["score"] < 0.5
    # Default heatmaps: the positive findings, most probable first, else the top one.
    assert [h["label"] for h in body["heatmaps"]] == (body["positives"] or [findings[0]["label"]])
    overlay = Image.open(io.BytesIO(base64.b64decode(body["heatmaps"][0]["png_base64"])))
    assert overlay.format == "PNG" and overlay.size == (128, 128)
    assert set(body["timings_ms"]) == {"read", "preprocess", "ood", "queue", "forward", "cam", "total"}
    if fmt == "dicom":
        assert body["image"]["dicom"]["Modality"] == "DX" and body["image"]["dicom"]["BitsStored"] == 12
    else:
        assert body["image"]["dicom"] is None


def test_served_probabilities_are_the_predictors(client: TestClient, run_dir, xray_png):
    expected = Predictor.from_checkpoint(run_dir).predict_images([read_image(xray_png)])[0]
    body = _post(client, xray_png, "?cam=false").json()
    served = {f["label"]: f["probability"] for f in body["findings"]}
    labels = client.get("/model").json()["labels"]
    assert [served[label] for label in labels] == pytest.approx(expected.tolist(), abs=1e-6)


def test_cam_off_and_chosen_labels(client: TestClient, xray_png):
    body = _post(client, xray_png, "?cam=false").json()
    assert body["heatmaps"] == []
    labels = client.get("/model").json()["labels"]
    wanted = [labels[-1], labels[0]]
    body = _post(client, xray_png, f"?labels={wanted[0]},%20{wanted[1]}&method=eigencam").json()
    assert [(h["label"], h["method"]) for h in body["heatmaps"]] == [(wanted[0], "eigencam"), (wanted[1], "eigencam")]


def test_token(secured_client: TestClient, token, xray_png):
    assert secured_client.get("/health").status_code == 200
    assert secured_client.get("/").status_code == 200  # the page shell holds no data
    for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": token}, {"Authorization": "Basic x"}):
        response = secured_client.get("/model", headers=headers)
        _error(response, 401, "unauthorized", "Bearer")
        assert response.headers["www-authenticate"] == "Bearer"
        _error(_post(secured_client, xray_png, headers=headers), 401, "unauthorized")
        _error(secured_client.get("/openapi.json", headers=headers), 401, "unauthorized")
    good = {"Authorization": f"Bearer {token}"}
    assert secured_client.get("/model", headers=good).status_code == 200
    assert _post(secured_client, xray_png, "?cam=false", headers=good).status_code == 200
    doc = secured_client.get("/openapi.json", headers=good).json()
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert secured_client.get("/docs").status_code == 404


def test_bad_images_are_named_4xx(client: TestClient, xray_png, xray_pixels, encode, make_dicom):
    _error(_post(client, b"hello, not an image"), 422, "unreadable_image", "not a PNG, JPEG or DICOM")
    _error(_post(client, xray_png[: len(xray_png) // 2]), 422, "unreadable_image", "truncated")
    _error(_post(client, b""), 422, "unreadable_image", "empty")
    _error(_post(client, make_dicom(xray_pixels, frames=3)), 422, "unreadable_image", "multi-frame")
    huge = encode(np.zeros((4100, 4100), dtype=np.uint8))  # 16.8 M pixels, over the 16 M default
    _error(_post(client, huge), 422, "unreadable_image", "pixels", "16,000,000")


def test_bad_requests_are_named_4xx(client: TestClient, xray_png):
    _error(client.post("/predict", files={"image": ("x.png", xray_png)}), 400, "missing_file", "'file'")
    _error(client.post("/predict", content=xray_png, headers={"Content-Type": "image/png"}), 415, "not_multipart")
    broken = {"Content-Type": "multipart/form-data; boundary=xyz"}
    _error(client.post("/predict", content=b"--xyz\r\nnonsense", headers=broken), 400, "missing_file")
    _error(
        client.post("/predict", content=b"x", headers={"Content-Type": "multipart/form-data"}),
        400,
        "malformed_multipart",
        "boundary",
    )
    _error(_post(client, xray_png, "?cam=maybe"), 422, "invalid_query", "cam")
    _error(_post(client, xray_png, "?method=bogus"), 422, "invalid_query", "gradcam")
    _error(_post(client, xray_png, "?method=scorecam"), 422, "invalid_query", "eigencam")
    _error(_post(client, xray_png, "?labels=spleen"), 422, "invalid_query", "'spleen'", "choose from")
    _error(client.get("/nowhere"), 404, "not_found")
    _error(client.delete("/predict"), 405, "method_not_allowed")


def test_body_over_the_limit_is_refused_early_and_while_read(run_dir, xray_png):
    with TestClient(create_app(run_dir, max_upload_bytes=100_000)) as small:
        big = os.urandom(150_000)
        _error(_post(small, big), 413, "upload_too_large", "100,000 bytes")

        def chunks():  # no Content-Length: refused while reading
            yield b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\n'
            for _ in range(20):
                yield b"\0" * 10_000

        headers = {"Content-Type": "multipart/form-data; boundary=b"}
        _error(small.post("/predict", content=chunks(), headers=headers), 413, "upload_too_large")
        assert _post(small, xray_png, "?cam=false").status_code == 200


def test_a_stalled_upload_times_out(live_server: str, monkeypatch):
    monkeypatch.setattr(serve_app, "UPLOAD_SECONDS", 0.3)
    host, port = live_server.removeprefix("http://").split(":")
    head = (
        "POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as stalled:
        stalled.sendall(head.encode())  # ... and never the rest of the 5,000 bytes
        received = b""
        while not received.endswith(b"}") and (chunk := stalled.recv(65536)):
            received += chunk
    answer = received.decode()
    assert answer.startswith("HTTP/1.1 408") and '"error":"upload_timeout"' in answer


def test_not_an_xray_is_flagged_without_heatmaps(client: TestClient, encode):
    blank = _post(client, encode(np.full((300, 300), 128, dtype=np.uint8))).json()
    assert blank["ood"]["flag"] is True and blank["ood"]["reasons"] and blank["heatmaps"] == []
    noise = np.random.default_rng(0).integers(0, 256, (200, 260, 3), dtype=np.uint8)
    colour = _post(client, encode(noise, "JPEG")).json()
    assert colour["ood"]["flag"] is True and colour["ood"]["checks"]["colour"] == 1.0


def test_face_models_skip_the_xray_guard():
    assert expects_chest_xrays({"config": {"train": {"augment": "xray"}}})
    assert not expects_chest_xrays({"config": {"train": {"augment": "face"}}})
    assert not expects_chest_xrays({"kind": "face-embedding"})


def test_no_patient_data_in_logs_or_answers(client: TestClient, live_server, xray_pixels, make_dicom, caplog):
    caplog.set_level(logging.DEBUG)
    dicom = make_dicom(xray_pixels)
    answers = [_post(client, dicom, name="CANARY^SECRET.dcm").text]
    with httpx.Client(base_url=live_server, timeout=60) as live:
        files = {"file": ("CANARY^SECRET.dcm", dicom, "application/dicom")}
        answers.append(live.post("/predict", files=files).text)
        answers.append(live.post("/predict", files={"file": ("CANARY.dcm", dicom[:300])}).text)  # unreadable
    assert '"dicom"' in answers[0] and "unreadable_image" in answers[2]
    logged = caplog.text + "".join(str(record.args) for record in caplog.records)
    assert "POST /predict" in logged and "predicted a dicom" in logged  # the capture does see both loggers
    for canary in CANARIES:
        assert canary not in logged
        assert all(canary not in answer for answer in answers)


def test_uploads_never_touch_disk(client: TestClient, encode, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an upload was about to be written to a temporary file")

    for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    before = set(os.listdir(tempfile.gettempdir()))
    photo = encode(np.random.default_rng(1).integers(0, 256, (1300, 1300, 3), dtype=np.uint8))
    assert len(photo) > 5_000_000
    assert _post(client, photo).status_code == 200
    assert set(os.listdir(tempfile.gettempdir())) <= before


def test_a_request_that_cannot_be_served_in_time_gets_503(run_dir, xray_png):
    with TestClient(create_app(run_dir, request_seconds=0.3)) as slow:
        busy = slow.app.state.model._workers._model.submit(time.sleep, 1.5)  # the model thread is taken
        _error(_post(slow, xray_png, "?cam=false"), 503, "request_timeout", "0.3 s")
        busy.result()
        assert _post(slow, xray_png, "?cam=false").status_code == 200  # and the server has recovered
    with pytest.raises(ConfigError, match="positive"):
        create_app(run_dir, request_seconds=0)


def test_openapi_describes_every_answer(client: TestClient):
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert {"Prediction", "ModelInfo", "Health", "ErrorResponse", "Finding", "Heatmap", "OodReport"} <= set(schemas)
    predict = doc["paths"]["/predict"]["post"]
    assert predict["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/Prediction")
    for status in ("400", "401", "413", "415", "422", "503"):
        assert predict["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    body = predict["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["file"]
    assert {p["name"] for p in predict["parameters"]} == {"cam", "method", "labels"}
    assert doc["paths"]["/model"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ModelInfo"
    )
    assert client.get("/docs").status_code == 200


def test_cli_parser(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLENS_TOKEN", "from-env")
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", str(tmp_path), "--port", "9001"])
    assert (args.host, args.port, args.token, args.checkpoint) == ("127.0.0.1", 9001, "from-env", tmp_path)
    assert parser.parse_args(["serve", str(tmp_path), "--token", "t"]).token == "t"
