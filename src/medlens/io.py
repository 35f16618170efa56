"""Writing files so that a reader, or a crash, only ever sees the old content or the new, never a part."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def write_atomic(path: str | Path, data: bytes | str, durable: bool = False) -> Path:
    """Write ``data`` beside ``path`` and rename it into place; ``durable`` also fsyncs before the rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, hex; OSError if it cannot be read."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()
