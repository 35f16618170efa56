"""Uploads parsed in memory: a multipart/form-data body (already read, size-capped) into its file field.

Starlette's own form parser spools files over 1 MB to a temporary file on disk; medical images must never
touch the disk, so the body is parsed here with python-multipart's streaming parser straight into memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from medlens.errors import MedlensError


class RequestError(MedlensError, ValueError):
    """A request that cannot be answered as sent; ``status`` and ``code`` say how to answer it."""

    def __init__(self, status: int, code: str, detail: str):
        self.status = status
        self.code = code
        self.detail = detail
        super().__init__(detail)


@dataclass
class _Part:
    headers: dict[str, bytes] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)

    @property
    def name(self) -> str | None:
        _, params = parse_options_header(self.headers.get("content-disposition", b""))
        name = params.get(b"name")
        return None if name is None else name.decode("utf-8", "replace")


def file_field(body: bytes, content_type: str | None, name: str = "file") -> bytes:
    """The bytes of the form field ``name`` of a multipart/form-data ``body``."""
    kind, params = parse_options_header(content_type or "")
    if kind != b"multipart/form-data":
        shown = kind.decode("latin-1") or "none"
        raise RequestError(
            415, "not_multipart", f"send the image as multipart/form-data with a {name!r} field, not {shown}"
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise RequestError(400, "malformed_multipart", "the multipart/form-data Content-Type has no boundary")
    parts = _parts(body, boundary)
    for part in parts:
        if part.name == name:
            return bytes(part.data)
    found = ", ".join(repr(part.name) for part in parts) or "none"
    raise RequestError(400, "missing_file", f"no {name!r} field in the form (fields found: {found})")


def _parts(body: bytes, boundary: bytes) -> list[_Part]:
    parts: list[_Part] = []
    current = _Part()
    header_name = bytearray()
    header_value = bytearray()

    def on_part_begin() -> None:
        nonlocal current
        current = _Part()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        current.headers[header_name.decode("latin-1").lower()] = bytes(header_value)
        header_name.clear()
        header_value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        current.data.extend(data[start:end])

    def on_part_end() -> None:
        parts.append(current)

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        problem = f"the multipart/form-data body cannot be parsed ({exc})"
        raise RequestError(400, "malformed_multipart", problem) from None
    return parts
