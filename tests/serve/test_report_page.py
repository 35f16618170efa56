"""``POST /report`` and the page's Download report button: a study report of the uploaded image, as HTML."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from medlens.reports.study import RESEARCH_USE

SCREENSHOT = Path("/tmp/medlens-report-download.png")
PAGE_SCREENSHOT = Path("/tmp/medlens-page-report-button.png")


def _named(page: str) -> set[str]:
    return set(re.findall(r'<li data-finding="([^"]+)">', page))


def test_report_is_an_html_download_naming_the_positive_findings(client, xray_png):
    response = client.post("/report", files={"file": ("ph.png", xray_png)})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert response.headers["content-disposition"] == 'attachment; filename="medlens-report.html"'
    page = response.text
    predicted = client.post("/predict?cam=false", files={"file": ("ph.png", xray_png)}).json()
    assert _named(page) == set(predicted["positives"])
    assert RESEARCH_USE in page and "Model card" in page and "ph.png" not in page
    assert "View: not known" in page


def test_report_needs_the_token_and_refuses_what_predict_refuses(secured_client, token, xray_png):
    upload = {"file": ("ph.png", xray_png)}
    assert secured_client.post("/report", files=upload).status_code == 401
    authorized = {"Authorization": f"Bearer {token}"}
    assert secured_client.post("/report?view=PA", files=upload, headers=authorized).status_code == 200
    bad_view = secured_client.post("/report?view=P%20A", files=upload, headers=authorized)
    assert bad_view.status_code == 422 and bad_view.json()["error"] == "invalid_query"
    junk = secured_client.post("/report", files={"file": ("x.png", b"not an image")}, headers=authorized)
    assert junk.status_code == 422 and junk.json()["error"] == "unreadable_image"


def test_a_dicom_report_states_its_view_and_no_patient_field(client, make_dicom):
    rows, cols = np.mgrid[:96, :96]
    film = (2000 + 1500 * np.sin(rows / 9.0) * np.cos(cols / 11.0)).astype(np.uint16) // 16
    page = client.post("/report", files={"file": ("scan.dcm", make_dicom(film))}).text
    assert "CANARY" not in page and "19010203" not in page
    assert "View: PA." in page


@pytest.mark.shared
@pytest.mark.slow
def test_the_download_report_button_saves_the_report_of_the_shown_image(browser, live_server, shared_data, tmp_path):
    page = browser.new_page(viewport={"width": 1200, "height": 900}, accept_downloads=True)
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(live_server)
    page.wait_for_selector("#model-name:not(:empty)")
    assert page.is_hidden("#report-actions")
    film = sorted((shared_data / "nih14" / "images").glob("*.png"))[0]
    page.set_input_files("#file", str(film))
    page.wait_for_selector("#report-actions:not([hidden])", timeout=60_000)
    with page.expect_download(timeout=60_000) as download:
        page.click("#download-report")
    assert download.value.suggested_filename == f"{film.stem}-report.html"
    saved = tmp_path / "report.html"
    download.value.save_as(saved)
    report = saved.read_text()
    assert "Study report" in report and RESEARCH_USE in report
    shown = {el.get_attribute("data-label") for el in page.locator("#findings .bar.positive").all()}
    assert _named(report) == shown or "does not look like a chest X-ray" in report

    page.screenshot(path=str(PAGE_SCREENSHOT), full_page=True)  # the button, to look at

    reader = browser.new_page(viewport={"width": 1100, "height": 1500})
    reader.goto(saved.as_uri())
    assert reader.locator("#summary li").count() >= 1
    reader.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    shutil.copy(tmp_path / "report.png", SCREENSHOT)  # to look at
    assert errors == []
