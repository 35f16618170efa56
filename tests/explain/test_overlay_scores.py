"""Overlays at the original resolution; pointing game and energy on maps with known answers."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from medlens.explain.overlay import blend, overlay_figure, overlay_png
from medlens.explain.scores import FindingScore, box_region, localize, summarize

H0, W0 = 60, 150  # a non-square original: the model's square input squashed it


def _image() -> np.ndarray:
    return np.tile(np.linspace(0.0, 1.0, W0, dtype=np.float32), (H0, 1))


def _peaked_map(row: int, col: int, side: int = 32) -> np.ndarray:
    heatmap = np.zeros((side, side), dtype=np.float32)
    heatmap[row, col] = 1.0
    return heatmap


def test_overlay_png_has_the_original_size():
    png = overlay_png(_image(), _peaked_map(5, 20))
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (W0, H0) and image.mode == "RGB"


def test_overlay_puts_the_heat_where_the_map_points():
    rgb = blend(_image(), _peaked_map(8, 24), alpha=1.0)
    # Map cell (8, 24) of 32 covers rows 15..16.9 and columns 112.5..117.2 of the 60 x 150 original.
    red = rgb[..., 0].astype(int) - rgb[..., 2]
    row, col = np.unravel_index(np.argmax(red), red.shape)
    assert 14 <= row <= 17 and 111 <= col <= 118


def test_overlay_figure_shows_the_image_one_to_one_and_is_written(tmp_path):
    image = np.random.default_rng(0).random((300, 400)).astype(np.float32)
    path = tmp_path / "figure.png"
    png = overlay_figure(image, _peaked_map(3, 3), "nodule  p = 0.91", path)
    assert path.read_bytes() == png
    with Image.open(path) as figure:
        assert figure.width > 400 and figure.height > 300  # the colour bar and caption come on top


def test_colour_images_keep_their_colours_under_a_zero_map():
    image = np.zeros((20, 30, 3), dtype=np.float32)
    image[..., 1] = 1.0
    rgb = blend(image, np.zeros((8, 8), dtype=np.float32), alpha=0.0)
    assert (rgb[..., 1] == 255).all() and (rgb[..., 0] == 0).all()


def test_box_region_takes_pixels_whose_centres_are_inside():
    region = box_region([(2.0, 1.0, 3.0, 2.0)], (5, 8))
    assert region.sum() == 6
    assert region[1:3, 2:5].all()
    assert box_region([(1.6, 0.0, 1.0, 1.0)], (2, 4))[0].tolist() == [False, False, True, False]


def test_a_map_peaked_inside_the_box_hits_and_its_energy_is_exact():
    heatmap = np.zeros((H0, W0), dtype=np.float32)
    heatmap[20, 100] = 3.0
    heatmap[20:30, 90:110] += 1.0  # 200 pixels, all inside the box
    heatmap[50, 10] = 2.0  # outside
    region = box_region([(90.0, 20.0, 20.0, 10.0)], (H0, W0))
    found = localize(heatmap, region)
    assert found.hit and found.peak == (20, 100)
    assert found.energy == pytest.approx(203.0 / 205.0)


def test_boxes_in_original_pixels_meet_a_model_size_map():
    # The peak cell (row 24, col 4) of a 32 x 32 map lies over rows 45-47 and columns 18.75-23.4 of the
    # 60 x 150 original; the box is given there, in original pixels, as NIH boxes are.
    heatmap = _peaked_map(24, 4)
    inside = localize(heatmap, box_region([(17.0, 43.0, 9.0, 7.0)], (H0, W0)))
    assert inside.hit and 45 <= inside.peak[0] <= 47 and 18 <= inside.peak[1] <= 23
    # The same box read as if the image were square (columns scaled by 32 / 60 instead of 32 / 150) misses.
    assert not localize(heatmap, box_region([(6.0, 43.0, 9.0, 7.0)], (H0, W0))).hit


def test_tolerance_counts_a_near_miss():
    heatmap = np.zeros((H0, W0), dtype=np.float32)
    heatmap[10, 10] = 1.0
    region = box_region([(20.0, 10.0, 5.0, 5.0)], (H0, W0))
    assert not localize(heatmap, region).hit
    assert localize(heatmap, region, tolerance=15).hit
    assert not localize(heatmap, region, tolerance=5).hit


def test_an_empty_map_misses_with_no_energy():
    found = localize(np.zeros((8, 8), dtype=np.float32), box_region([(0.0, 0.0, 10.0, 10.0)], (H0, W0)))
    assert not found.hit and found.energy == 0.0


def test_bad_regions_and_boxes_are_refused():
    with pytest.raises(ValueError, match="non-empty"):
        localize(np.ones((4, 4)), np.zeros((H0, W0), dtype=bool))
    with pytest.raises(ValueError, match="positive width"):
        box_region([(1.0, 1.0, 0.0, 4.0)], (H0, W0))


def test_summaries_per_finding_and_overall():
    scores = [
        FindingScore("a.png", "nodule", 0.9, True, 0.5),
        FindingScore("b.png", "nodule", 0.4, False, 0.1),
        FindingScore("a.png", "effusion", 0.8, True, 0.7),
    ]
    summary = summarize(scores)
    assert list(summary) == ["effusion", "nodule", "all"]
    assert summary["nodule"] == {"n": 2, "pointing": 0.5, "energy": pytest.approx(0.3)}
    assert summary["all"]["n"] == 3 and summary["all"]["pointing"] == pytest.approx(2 / 3)
    assert summarize([]) == {}
