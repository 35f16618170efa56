"""The page in a real browser (the system Chromium through Playwright) against a real uvicorn server."""

from __future__ import annotations

import base64

import pytest


@pytest.mark.shared
@pytest.mark.slow
def test_upload_shows_bars_and_heatmap(browser, live_server, shared_data, tmp_path):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(live_server)
    page.wait_for_selector("#model-name:not(:empty)")
    labels = page.evaluate("fetch('/model').then(r => r.json()).then(m => m.labels)")
    assert "not for diagnosis" in page.text_content(".notice")

    xray = sorted((shared_data / "nih14" / "images").glob("*.png"))[0]
    page.set_input_files("#file", str(xray))
    page.wait_for_selector("#heatmap:not([hidden])", timeout=60_000)
    bars = page.locator("#findings .bar")
    assert bars.count() == len(labels)
    shown = [float(v.rstrip("%")) for v in page.locator("#findings .bar .value").all_text_contents()]
    assert shown == sorted(shown, reverse=True)
    assert page.locator("#findings .threshold").count() == len(labels)
    assert page.get_attribute("#heatmap", "src").startswith("data:image/png;base64,")
    assert page.locator("#heatmap-choice button").count() >= 2  # one per heatmap, and the original
    assert page.is_hidden("#ood") and page.is_hidden("#error")
    page.screenshot(path=str(tmp_path / "xray.png"), full_page=True)

    face = sorted((shared_data / "faces-lfw15").rglob("*.jpg"))[0]
    page.set_input_files("#file", str(face))
    page.wait_for_selector("#ood:not([hidden])", timeout=60_000)
    assert page.is_hidden("#results") and page.locator("#ood-reasons li").count() >= 1
    page.screenshot(path=str(tmp_path / "face.png"), full_page=True)

    # Dropped instead of chosen: the film's bytes as a File in a drop event on the drop zone.
    dropped = page.evaluate_handle(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
            return transfer;
        }""",
        base64.b64encode(xray.read_bytes()).decode("ascii"),
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
    page.wait_for_selector("#ood", state="hidden", timeout=60_000)
    page.wait_for_selector("#heatmap:not([hidden])", timeout=60_000)
    assert page.locator("#findings .bar").count() == len(labels)

    page.set_input_files("#file", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image"}])
    page.wait_for_selector("#error:not([hidden])", timeout=60_000)
    assert "not a PNG, JPEG or DICOM" in page.text_content("#error")
    assert [e for e in errors if "422" not in e] == []
