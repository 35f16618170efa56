"""Descriptors: shape, identity, the per-image cache (a second call runs no dlib), timings, no-face rows."""

from __future__ import annotations

import numpy as np
import pytest

from medlens.errors import ImageReadError
from medlens.faces import embed as embed_module
from medlens.faces.detect import FacesConfig
from medlens.faces.embed import embed_face, embed_paths, face_cache, file_sha256
from medlens.models.heads import unit_rows


def _photos(lfw, person, n):
    return sorted((lfw / person).glob("*.jpg"))[:n]


def test_a_descriptor_is_128_floats_closer_within_a_person(lfw):
    blair = [embed_face(p).vector for p in _photos(lfw, "Tony_Blair", 2)]
    serena = embed_face(_photos(lfw, "Serena_Williams", 1)[0]).vector
    assert blair[0].shape == (128,) and blair[0].dtype == np.float32
    assert np.linalg.norm(blair[0] - blair[1]) < np.linalg.norm(blair[0] - serena)
    assert np.linalg.norm(blair[0] - serena) > 0.6  # dlib's same-person threshold


def test_second_call_hits_the_cache_without_calling_dlib(lfw, shared_data, tmp_path, monkeypatch):
    paths = [*_photos(lfw, "Hugo_Chavez", 2), shared_data / "face-probes" / "noface" / "chelsea.png"]
    calls = {"detect": 0}
    real_detect = embed_module.detect_face

    def counting_detect(*args, **kwargs):
        calls["detect"] += 1
        return real_detect(*args, **kwargs)

    monkeypatch.setattr(embed_module, "detect_face", counting_detect)
    first = embed_paths(paths, cache_dir=tmp_path, progress=False)
    assert calls["detect"] == 3 and not first.from_cache.any()
    assert first.n_faces.tolist() == [1, 1, 0] and first.no_face == [paths[2]]
    assert np.isnan(first.embeddings[2]).all() and np.isfinite(first.embeddings[:2]).all()
    assert set(first.ms_per_image) == {"read", "detect", "align", "embed"}
    assert all(ms > 0 for ms in first.ms_per_image.values())

    monkeypatch.setattr(embed_module, "descriptor_model", lambda: pytest.fail("dlib called on a cached photo"))
    second = embed_paths(paths, cache_dir=tmp_path, progress=False)
    assert calls["detect"] == 3 and second.from_cache.all() and second.ms_per_image == {}
    np.testing.assert_array_equal(second.embeddings, first.embeddings)
    assert second.n_faces.tolist() == [1, 1, 0]


def test_cache_is_keyed_by_content_and_settings(lfw, tmp_path):
    photo = _photos(lfw, "Tony_Blair", 1)[0]
    alias = tmp_path / "renamed.jpg"
    alias.symlink_to(photo)
    embed_paths([photo], cache_dir=tmp_path / "cache", progress=False)
    assert embed_paths([alias], cache_dir=tmp_path / "cache", progress=False).from_cache.all()
    other = embed_paths([photo], FacesConfig(upsample=0), cache_dir=tmp_path / "cache", progress=False)
    assert not other.from_cache.any()
    cache = face_cache(tmp_path / "cache")
    assert len(cache) == 1 and cache.get(file_sha256(photo))[1] == 1
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert files == ["hog-up0-chip150-pad0.25.npz", "hog-up1-chip150-pad0.25.npz"]


def test_a_corrupt_cache_is_rebuilt_not_fatal(tmp_path):
    (tmp_path / "hog-up1-chip150-pad0.25.npz").write_bytes(b"not a zip")
    assert len(face_cache(tmp_path)) == 0


def test_missing_photo_is_named(tmp_path):
    with pytest.raises(ImageReadError, match=r"nope\.jpg"):
        embed_paths([tmp_path / "nope.jpg"], cache_dir=tmp_path, progress=False)


def test_the_session_embeddings_and_their_timings(lfw_batch):
    table, batch = lfw_batch
    assert batch.embeddings.shape == (len(table), 128)
    assert batch.has_face.sum() >= 490  # LFW photos are centred faces; a handful defeat the HOG detector
    if batch.ms_per_image:  # empty when an earlier run filled the cache
        print("ms per photo:", {k: round(v, 1) for k, v in batch.ms_per_image.items()})


def test_unit_rows_refuses_nan():
    assert np.allclose(np.linalg.norm(unit_rows([[3.0, 4.0]]), axis=1), 1.0)
    with pytest.raises(ValueError, match="without a face"):
        unit_rows([[np.nan, 1.0]])
