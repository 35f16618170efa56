"""``medlens audit`` end to end: a tiny model trained on phantoms stamped with their class's site is caught on
every check; the same model trained on honest phantoms is not; a real cxr4 run is audited."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import short_real_run, tiny_run

from medlens.cli import main
from medlens.config import load_config
from medlens.configs import find_config
from medlens.data.phantoms import generate_phantoms
from medlens.errors import ConfigError, DataSourceError
from medlens.jobs.audit import audit
from medlens.jobs.train import train

TRAIN = tiny_run(
    "model.name=test_resnet", "data.image_size=96", "train.epochs=8", "train.batch_size=8", "train.lr=3e-3",
    "train.export_onnx=false", "data.test_fraction=0.1",
)  # fmt: skip
"""timm's test ResNet at 96 px (a 3 x 3 CAM grid): learns the stamp in 8 epochs of 96 phantoms."""
CHECKS = ("source", "border", "evidence")


def _trained(root: Path, marker: bool) -> tuple[Path, Path]:
    """A tiny run on 96 phantoms, and 72 fresh ones of the same kind to audit it on."""
    kind = "cheat" if marker else "honest"
    data = generate_phantoms(root / kind, n=96, task="multiclass", size=64, seed=0, progress=False, marker=marker)
    held_out = generate_phantoms(root / f"{kind}-new", n=72, task="multiclass", size=64, seed=1, progress=False,
                                 marker=marker)  # fmt: skip
    run = root / f"{kind}-run"
    train(load_config(None, [*TRAIN, f"data.source={data}"]), run, progress=False)
    return run, held_out


@pytest.fixture(scope="module")
def cheating(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("audit")
    run, held_out = _trained(root, marker=True)
    out = root / "cheat-audit"
    assert main(["audit", str(run), "--data", str(held_out), "--out", str(out), "--resamples", "100",
                 "--cam-images", "16"]) == 0  # fmt: skip
    return {"run": run, "held_out": held_out, "out": out, "numbers": json.loads((out / "audit.json").read_text())}


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("audit")
    run, held_out = _trained(root, marker=False)
    result = audit(run, root / "honest-audit", source=held_out, n_resamples=100, cam_images=16, progress=False)
    return {"run": run, "numbers": result.numbers}


def _flags(numbers: dict) -> dict[str, bool]:
    return {v["check"]: v["flagged"] for v in numbers["verdicts"]}


def test_a_model_that_learned_the_marker_is_flagged_on_every_check(cheating, capsys):
    numbers = cheating["numbers"]
    flags = _flags(numbers)
    assert all(flags[check] for check in CHECKS), numbers["verdicts"]
    source = numbers["source"]
    assert source["column"] == "source" and source["label_dependence"]["cramers_v"] == pytest.approx(1.0)
    assert numbers["evidence"]["region"].startswith("lung fields"), "the phantoms' own lung masks are used"
    assert numbers["text"]["n_with_text"] > 0, "the stamps are found as burned-in marks"
    page = (cheating["out"] / "audit.html").read_text(encoding="utf-8")
    assert "Verdicts" in page and page.count("data:image/png;base64,") >= 2, "the group chart and the image grid"


def test_the_same_model_on_honest_phantoms_is_not_flagged(honest):
    flags = _flags(honest["numbers"])
    assert not any(flags[check] for check in CHECKS), honest["numbers"]["verdicts"]
    assert honest["numbers"]["source"]["label_dependence"]["cramers_v"] < 0.5


def test_every_evaluation_report_carries_the_per_source_check(cheating, tmp_path):
    assert main(["evaluate", str(cheating["run"]), "--data", str(cheating["held_out"]), "--out", str(tmp_path),
                 "--resamples", "100"]) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["shortcuts"]["columns"]) == {"source"}
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert 'id="shortcuts"' in page and "medlens audit RUN" in page


def test_bad_audit_input_is_a_one_line_error(cheating, tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        audit(cheating["run"], tmp_path, masks=tmp_path, lung_boxes=tmp_path / "b.csv", progress=False)
    with pytest.raises(DataSourceError, match="--masks"):
        audit(cheating["run"], tmp_path, masks=tmp_path / "absent", progress=False)
    with pytest.raises(ConfigError, match="heatmap method"):
        audit(cheating["run"], tmp_path, method="nope", progress=False)
    assert not (tmp_path / "audit.json").exists()


@pytest.mark.shared
def test_audit_a_real_cxr4_run(tmp_path, shared_data):
    source = shared_data / "cxr4"
    run = tmp_path / "run"
    overrides = [*short_real_run(source, tmp_path / "cache"), "train.export_onnx=false"]
    train(load_config(find_config("cxr4"), overrides), run, progress=False)
    result = audit(run, tmp_path / "audit", source=source, n_resamples=200, cam_images=8, progress=False)
    numbers = result.numbers
    assert numbers["source"]["column"] == "site", "cxr4's patient ids name the site"
    assert numbers["source"]["label_dependence"]["cramers_v"] > 0.5, "cxr4's classes and sources are entangled"
    assert numbers["evidence"]["region"].startswith("central region")
    assert {v["check"] for v in numbers["verdicts"]} >= {"groups", "source", "border", "text", "evidence"}
