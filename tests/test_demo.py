"""The README's main job: phantoms -> training -> evaluation -> heatmaps; the model must have learned."""

from __future__ import annotations

import json

import pytest

from medlens.cli import main


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_demo_learns_the_phantoms(demo_run):
    metrics = json.loads((demo_run / "evaluation" / "metrics.json").read_text())
    assert metrics["task"] == "multilabel" and metrics["n_images"] >= 150
    assert metrics["auc_summary"]["mean"] >= 0.9, metrics["auc"]
    assert {"predictions.csv", "report.html"} <= {p.name for p in (demo_run / "evaluation").iterdir()}


@pytest.mark.slow
def test_demo_heatmaps_point_at_the_lesions(demo_run):
    # A broken target layer or a map unrelated to the finding scores far lower (a centred map: ~0.15).
    scores = json.loads((demo_run / "evaluation" / "localization.json").read_text())
    assert scores["all"]["pointing"] >= 0.8, scores
    assert set(scores) == {"nodule", "effusion", "consolidation", "cardiomegaly", "pneumothorax", "all"}
