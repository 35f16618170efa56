"""Frozen embedders a probe learns on, found by name, and rebuilt from what a checkpoint records.

An embedder turns images into fixed-length vectors and says what it was made for. It has ``name``,
``channels`` (what to read images as), ``inputs`` (``face-photo``, ``chest-xray``), ``size`` (the vector
length), ``spec()`` (what a checkpoint records to rebuild it), ``cache_tag`` (what its cached vectors are
keyed by beside each image's hash), ``frame(pixels)`` (the image it describes: a face's aligned chip; a
``no_frame_error`` when there is nothing to describe), ``embed_frames(images)`` and ``embed_paths(paths,
cache_dir)`` (vectors of files, NaN rows where there is no frame, and per-file details).

``dlib_face`` is dlib's 128-d face descriptor (the ``faces`` extra), aligned as the config's ``faces``
section says.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medlens.config import Config, FacesConfig
from medlens.errors import CheckpointError, ConfigError

FACE_EMBEDDER = "dlib_face"
EMBEDDERS = (FACE_EMBEDDER,)


def is_embedder(name: str) -> bool:
    """Whether ``name`` is an embedder of its own (not a backbone)."""
    return name in EMBEDDERS


def create_embedder(config: Config) -> Any:
    """The embedder a probe config names."""
    if config.model.name == FACE_EMBEDDER:
        from medlens.faces.embed import FaceEmbedder

        return FaceEmbedder(config.faces)
    known = ", ".join(EMBEDDERS)
    raise ConfigError(f"model.name={config.model.name!r} is not an embedder for a probe; choose one of {known}")


def embedder_from_spec(spec: Mapping[str, Any]) -> Any:
    """The embedder a checkpoint's ``embedder`` record describes."""
    name = spec.get("name")
    if name == FACE_EMBEDDER:
        from medlens.faces.embed import FaceEmbedder

        return FaceEmbedder(FacesConfig.from_dict(spec.get("faces", {})))
    raise CheckpointError(f"unknown embedder {name!r} in the checkpoint; known: {', '.join(EMBEDDERS)}")
