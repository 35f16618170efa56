"""The shortcut audit's numbers and regions on synthetic inputs: groups, source probes, covering, verdicts."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from medlens.data import regions
from medlens.evaluation import audit as checks


def _multiclass(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.DataFrame]:
    """Two sources: the model is right on 95% of source A's images and on 30% of B's."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 3, n)
    source = np.where(np.arange(n) < n // 2, "A", "B")
    right = rng.random(n) < np.where(source == "A", 0.95, 0.3)
    called = np.where(right, classes, (classes + 1) % 3)
    probs = np.full((n, 3), 0.1)
    probs[np.arange(n), called] = 0.8
    ids = np.array([f"{s.lower()}:{i // 2}" for i, s in enumerate(source)])
    return np.eye(3)[classes], probs, ids, pd.DataFrame({"source": source, "view": rng.choice(["PA", "AP"], n)})


def test_a_group_whose_interval_lies_below_the_pooled_one_is_flagged():
    y, p, ids, frame = _multiclass()
    found = checks.group_performance("multiclass", y, p, ids, frame, n_resamples=300)
    assert found["metric"] == "accuracy" and found["flagged"] == ["source=B"]
    b, a = found["columns"]["source"]["B"], found["columns"]["source"]["A"]
    assert b["ci"][1] < found["pooled"]["ci"][0] <= found["pooled"]["value"] <= found["pooled"]["ci"][1]
    assert not a["below"] and a["value"] > found["pooled"]["value"] and b["n_patients"] == 30
    site = checks.with_site(frame.drop(columns="source"), ids)
    assert list(site["site"].unique()) == ["a", "b"], "site:id patient ids give the site"
    assert "site" not in checks.with_site(frame, [f"P{i}" for i in range(len(frame))])
    again = checks.group_performance("multiclass", y, p, ids, frame, n_resamples=300)
    assert again == found, "same seed, same intervals"


def test_multilabel_groups_use_the_macro_auc():
    rng = np.random.default_rng(2)
    y = (rng.random((150, 2)) < 0.4).astype(float)
    p = np.clip(0.3 * y + 0.7 * rng.random((150, 2)), 0, 1)
    frame = pd.DataFrame({"sex": rng.choice(["F", "M"], 150), "age": rng.integers(20, 90, 150)})
    found = checks.group_performance("multilabel", y, p, [str(i) for i in range(150)], frame, n_resamples=200)
    assert found["metric"] == "macro_auc" and set(found["columns"]) == {"sex", "age"}
    assert 0.7 < found["pooled"]["value"] < 1 and found["pooled"]["ci"][0] < found["pooled"]["value"]


def test_label_dependence_and_source_probe_tell_entangled_from_independent_sources():
    rng = np.random.default_rng(1)
    n = 160
    classes = rng.integers(0, 2, n)
    y = np.eye(2)[classes]
    entangled = np.where(classes == 1, "A", "B")
    independent = rng.choice(["A", "B"], n)
    assert checks.label_dependence(y, entangled, "multiclass")["cramers_v"] == pytest.approx(1.0)
    assert checks.label_dependence(y, independent, "multiclass")["cramers_v"] < 0.25
    mi = checks.label_dependence(y, entangled, "multiclass")["mutual_information_bits"]
    assert mi == pytest.approx(1.0, abs=0.02), "a balanced binary label fully given by the source: 1 bit"
    ids = [f"P{i // 2}" for i in range(n)]
    marked = rng.normal(size=(n, 20)) + 2.0 * (entangled == "A")[:, None]
    probe = checks.source_probe(marked, entangled, ids)
    assert probe["balanced_accuracy"] > 0.9 and probe["chance"] == 0.5 and checks.is_high(probe)
    noise = checks.source_probe(rng.normal(size=(n, 20)), independent, ids)
    assert abs(noise["balanced_accuracy"] - 0.5) < 0.2 and not checks.is_high(noise)
    lonely = checks.source_probe(marked, ["A"] * (n - 1) + ["C"], ids)
    assert lonely["balanced_accuracy"] is None and lonely["left_out_sources"] == ["C"]


def test_score_change_counts_flips_and_auc_drops():
    rng = np.random.default_rng(3)
    y = np.eye(2)[rng.integers(0, 2, 100)]
    before = np.clip(0.8 * y + 0.1 + 0.05 * rng.random((100, 2)), 0, 1)
    same = checks.score_change("multiclass", y, before, before, ["a", "b"], [0.5, 0.5])
    assert same["flip_share"] == 0 and same["mean_abs_change"] == 0 and same["max_auc_drop"] == 0
    assert not checks.moves_too_much(same)
    swapped = checks.score_change("multiclass", y, before, before[:, ::-1], ["a", "b"], [0.5, 0.5])
    assert swapped["flip_share"] == 1 and swapped["max_auc_drop"] == pytest.approx(1.0)
    assert checks.moves_too_much(swapped) and len(swapped["per_image"]) == 100


def test_verdicts_give_one_line_per_check_with_its_numbers():
    y, p, ids, frame = _multiclass()
    change = checks.score_change("multiclass", y, p, p, ["a", "b", "c"], [0.5] * 3)
    audit = {
        "groups": checks.group_performance("multiclass", y, p, ids, frame, n_resamples=200),
        "source": {
            "column": "source",
            "from_embeddings": {"balanced_accuracy": 0.97, "chance": 0.5},
            "from_pixels": {"balanced_accuracy": 0.6, "chance": 0.5},
            "label_dependence": {"cramers_v": 0.9},
        },
        "border": {"covers": [{"width_share": 0.08, "mode": "blank", **change}]},
        "text": {"n_images": 120, "n_with_text": 0, "change": None},
        "evidence": checks.evidence_share([0.1, 0.2], [0.4, 0.4]) | {"region": "lung fields"},
    }
    lines = {v["check"]: v for v in checks.verdicts(audit)}
    assert set(lines) == {"groups", "source", "border", "text", "evidence"}
    assert lines["groups"]["flagged"] and "source B" in lines["groups"]["line"]
    assert lines["source"]["flagged"] and "recognising the source" in lines["source"]["line"]
    assert "0.97" in lines["source"]["line"] and "0.90" in lines["source"]["line"]
    assert not lines["border"]["flagged"] and not lines["text"]["flagged"]
    assert lines["evidence"]["flagged"] and "40%" in lines["evidence"]["line"]


def test_a_flagged_border_says_whether_the_ranking_survived_the_cover():
    rng = np.random.default_rng(4)
    y = (rng.random((100, 2)) < 0.4).astype(float)
    before = np.clip(0.6 * y + 0.2 + 0.1 * rng.random((100, 2)), 0, 1)

    def border_line(after: np.ndarray) -> dict:
        change = checks.score_change("multilabel", y, before, after, ["a", "b"], [0.5, 0.5])
        audit = {"border": {"covers": [{"width_share": 0.04, "mode": "blank", **change}]}}
        return checks.verdicts(audit)[0]

    shifted = border_line(np.clip(before + 0.3, 0, 1))  # every score up alike: calls flip, the ranking holds
    assert shifted["flagged"] and "AUCs hold" in shifted["line"] and "thresholds" in shifted["line"]
    scrambled = border_line(rng.random((100, 2)))  # the answers gone with the border
    assert scrambled["flagged"] and "reads its answers off the image's border" in scrambled["line"]


def _film(size: int = 256) -> np.ndarray:
    """A smooth film-like picture: bright middle, dark corners."""
    y, x = np.mgrid[0:size, 0:size] / size
    return (0.2 + 0.5 * np.exp(-((x - 0.5) ** 2 + (y - 0.5) ** 2) / 0.08)).astype(np.float32)


def test_cover_changes_only_the_region_and_every_mode_hides_a_stamp():
    image = (np.clip(_film(), 0, 1) * 255).astype(np.uint8)
    image[3:12, 3:12] = 255
    width = regions.border_widths(image.shape)[-1]
    assert regions.border_widths(image.shape) == [11, 21] and width == 21
    band = regions.border_band(image.shape, width)
    assert band[0].all() and not band[width:-width, width:-width].any()
    for mode in regions.COVER_MODES:
        covered = regions.cover(image, band, mode)
        assert (covered[~band] == image[~band]).all(), mode
        assert covered[3:12, 3:12].max() < 200, f"{mode} leaves the stamp"
    floats = regions.cover(image.astype(np.float32) / 255, band, "inpaint")
    assert floats.dtype == np.float32 and floats.max() <= 1
    with pytest.raises(ValueError, match="cover mode"):
        regions.cover(image, band, "erase")


def test_find_text_finds_burned_in_print_near_the_edge_and_nothing_on_a_plain_film():
    plain = _film(512)
    assert regions.find_text(plain) == []
    printed = (plain * 255).astype(np.uint8)
    cv2.putText(printed, "PORTABLE", (20, 40), cv2.FONT_HERSHEY_SIMPLEX, 0.8, 255, 2)
    boxes = regions.find_text(printed)
    assert boxes, "the print was not found"
    mask = regions.box_mask(boxes, printed.shape)
    assert mask[20:40, 30:100].mean() > 0.8 and mask.mean() < 0.05
    central = regions.central_region((100, 200))
    assert central.sum() == pytest.approx(0.6 * 200 * 0.7 * 100, rel=0.05)


def test_a_model_at_chance_has_its_evidence_reported_not_judged():
    rng = np.random.default_rng(5)
    classes = rng.choice(3, 90, p=[0.5, 0.3, 0.2])
    y, ids = np.eye(3)[classes], [str(i) for i in range(90)]
    frame = pd.DataFrame({"source": rng.choice(["A", "B"], 90)})
    guessing = checks.group_performance("multiclass", y, rng.random((90, 3)), ids, frame, n_resamples=200)
    assert guessing["pooled"]["chance"] == pytest.approx(np.bincount(classes).max() / 90)
    assert not checks.beats_chance(guessing)
    spread = checks.evidence_share([0.1, 0.2], [0.4, 0.4]) | {"region": "lung fields"}
    line = {v["check"]: v for v in checks.verdicts({"groups": guessing, "evidence": spread})}["evidence"]
    assert not line["flagged"] and line["line"].startswith("not judged") and "40%" in line["line"]
    y, p, ids, frame = _multiclass()
    assert checks.beats_chance(checks.group_performance("multiclass", y, p, ids, frame, n_resamples=200))
    assert checks.beats_chance(None), "with no interval to go by, the evidence is judged"


def test_the_group_chart_draws_without_a_pooled_interval():
    import warnings

    from medlens.evaluation.plots import plot_groups

    y, p, ids, frame = _multiclass()
    found = checks.group_performance("multiclass", y, p, ids, frame, n_resamples=50)
    undefined = {**found, "pooled": {**found["pooled"], "value": None, "ci": None}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns when asked for a legend with nothing labelled
        for groups in (found, undefined):
            assert plot_groups(groups).startswith(b"\x89PNG")
