"""The HTTP app, kept thin: the model loads once in the lifespan; handlers parse, call it, serialise.

``GET /health`` (never needs a token), ``GET /model``, ``POST /predict``, ``POST /report`` (a study report
to download) and the page at ``GET /``.
With a token, ``/model``, ``/predict``, ``/report`` and ``/openapi.json`` need ``Authorization: Bearer TOKEN`` and
``/docs`` is off (the page itself is a static shell that holds no data, so it stays public, as does
``/health``).
Uploads are read into memory with a size cap and never written to disk; nothing logged carries image
bytes, file names or DICOM patient fields. Every failure answers JSON ``{"error", "detail"}``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from medlens.errors import ConfigError, ImageReadError
from medlens.models.checkpoint import resolve_checkpoint
from medlens.reports.study_page import render_study
from medlens.serve.schemas import ErrorResponse, Health, Limits, ModelInfo, Prediction
from medlens.serve.service import SERVED_METHODS, PredictOptions, ServedModel, load_served_model
from medlens.serve.uploads import RequestError, file_field

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_BYTES = 32 * 1024 * 1024
UPLOAD_SECONDS = 60.0
"""An upload must arrive within this time: a stalled client gets 408 instead of holding a request open."""
DEFAULT_MAX_PIXELS = 16_000_000
"""Enough for any chest film (a 4,000 x 4,000 detector); a larger image would cost seconds and gigabytes."""
DEFAULT_REQUEST_SECONDS = 120.0
"""Longest a request may queue for and use the model: a ScoreCAM-free heatmap request takes ~1 s on 2 cores."""

VIEW = r"^[A-Za-z]{1,12}$"
REPORT_FILENAME = "medlens-report.html"
"""Never the upload's own name, which may name the patient; the page names its download after the file."""

CamMethod = Enum("CamMethod", {name: name for name in SERVED_METHODS}, type=str)  # type: ignore[misc]
BEARER = HTTPBearer(auto_error=False, description="the token the server was started with")

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "no file field, or a malformed form"),
        (401, "missing or wrong bearer token"),
        (408, "the upload did not arrive in time"),
        (413, "upload over the size limit"),
        (415, "not multipart/form-data"),
        (422, "unreadable image, no face (face models) or invalid query"),
        (503, "the model is not loaded yet, or the request could not be served in time"),
    )
}
JSON_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {
        "description": answer["description"],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    for status, answer in ERRORS.items()
}
"""ERRORS for a route whose own answer is not JSON: FastAPI would document them in the route's media type."""
UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary", "description": "PNG, JPEG or DICOM"}},
            }
        }
    },
}


class RequestTooLarge(RequestError):
    def __init__(self, limit: int):
        super().__init__(413, "upload_too_large", f"the upload is over the limit of {limit:,} bytes")


def create_app(
    checkpoint: str | Path,
    token: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    request_seconds: float = DEFAULT_REQUEST_SECONDS,
    device: str = "auto",
) -> FastAPI:
    """The app serving ``checkpoint`` (a checkpoint or run folder), which loads when the app starts."""
    folder = resolve_checkpoint(checkpoint)  # fail now, not at the first request, on a wrong path
    if request_seconds <= 0:
        raise ConfigError(f"the request timeout must be a positive number of seconds, not {request_seconds}")
    limits = Limits(max_upload_bytes=max_upload_bytes, max_pixels=max_pixels, request_seconds=request_seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.model = load_served_model(folder, limits, device)
        log.info("serving %s (%d labels)", folder, len(app.state.model.labels))
        yield
        app.state.model.close()
        app.state.model = None

    secured = token is not None
    app = FastAPI(
        title="medlens",
        summary="Chest X-ray findings with heatmaps. For research only, not for diagnosis.",
        lifespan=lifespan,
        openapi_url=None if secured else "/openapi.json",
        docs_url=None if secured else "/docs",
        redoc_url=None,
    )
    app.state.model = None
    app.state.token = token
    app.state.limits = limits
    _add_error_handlers(app)
    _add_routes(app, authorize if secured else _open)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


# The dependencies below are async only because they never block: FastAPI runs a plain ``def`` dependency on
# a worker thread, and each such hop cost ~0.5 ms per request.


async def _open() -> None:
    """No token configured: every endpoint is open."""


async def authorize(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
) -> None:
    """Require ``Authorization: Bearer <token>``, compared in constant time."""
    expected: str = request.app.state.token
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise StarletteHTTPException(401, "send the server's token as Authorization: Bearer <token>")


async def served_model(request: Request) -> ServedModel:
    model: ServedModel | None = request.app.state.model
    if model is None:
        raise StarletteHTTPException(503, "the model is not loaded yet; retry in a moment")
    return model


async def upload(request: Request) -> bytes:
    """The request body, read into memory and refused as soon as it passes the limit or the time."""
    limit: int = request.app.state.limits.max_upload_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(limit)
    body = bytearray()
    try:
        async with asyncio.timeout(UPLOAD_SECONDS):
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > limit:
                    raise RequestTooLarge(limit)
    except TimeoutError:
        raise RequestError(408, "upload_timeout", f"the upload did not arrive within {UPLOAD_SECONDS:.0f} s") from None
    return bytes(body)


def _add_routes(app: FastAPI, guard: Any) -> None:
    @app.get("/health", response_model=Health, tags=["service"])
    def health(request: Request) -> Health:
        loaded = request.app.state.model is not None
        return Health(status="ok" if loaded else "starting", model_loaded=loaded)

    @app.get(
        "/model",
        response_model=ModelInfo,
        responses={401: ERRORS[401], 503: ERRORS[503]},
        dependencies=[Depends(guard)],
        tags=["model"],
    )
    def model_info(model: Annotated[ServedModel, Depends(served_model)]) -> ModelInfo:
        return model.info()

    @app.post(
        "/predict",
        response_model=Prediction,
        responses=ERRORS,
        dependencies=[Depends(guard)],
        openapi_extra={"requestBody": UPLOAD_BODY},
        tags=["model"],
    )
    def predict(
        request: Request,
        model: Annotated[ServedModel, Depends(served_model)],
        body: Annotated[bytes, Depends(upload)],
        cam: Annotated[bool, Query(description="draw heatmaps")] = True,
        method: Annotated[
            CamMethod | None, Query(description="heatmap method (default: the model's first, see /model)")
        ] = None,
        labels: Annotated[
            str | None, Query(description="comma-separated labels to explain (default: the positive ones)")
        ] = None,
    ) -> Response:
        """Findings for one PNG, JPEG or DICOM image (multipart field ``file``), with heatmaps."""
        data = file_field(body, request.headers.get("content-type"))
        chosen = None if method is None else method.value
        options = PredictOptions(cam=cam, method=chosen, explain=_labels(labels, model.labels))
        prediction = model.predict(data, options)
        log.info(
            "predicted a %s of %dx%d in %.0f ms%s",
            prediction.image.format,
            prediction.image.width,
            prediction.image.height,
            prediction.timings_ms.total,
            " (flagged: not a chest X-ray)" if prediction.ood and prediction.ood.flag else "",
        )
        # Serialised here: the model was validated when built, and FastAPI would validate it again (~0.5 ms).
        return Response(prediction.model_dump_json(), media_type="application/json")

    @app.post(
        "/report",
        response_class=HTMLResponse,
        responses=JSON_ERRORS,
        dependencies=[Depends(guard)],
        openapi_extra={"requestBody": UPLOAD_BODY},
        tags=["model"],
    )
    def report(
        request: Request,
        model: Annotated[ServedModel, Depends(served_model)],
        body: Annotated[bytes, Depends(upload)],
        view: Annotated[str | None, Query(description="PA, AP...: the view if a DICOM says none", pattern=VIEW)] = None,
    ) -> HTMLResponse:
        """The study report of one image (multipart field ``file``): one self-contained HTML file to download."""
        data = file_field(body, request.headers.get("content-type"))
        page = render_study(model.study(data, view))
        return HTMLResponse(page, headers={"Content-Disposition": f'attachment; filename="{REPORT_FILENAME}"'})

    if app.openapi_url is None:

        @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(guard)])
        def openapi() -> dict[str, Any]:
            return app.openapi()

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")


def _labels(text: str | None, known: list[str]) -> tuple[str, ...]:
    if text is None or not text.strip():
        return ()
    asked = tuple(dict.fromkeys(label.strip() for label in text.split(",") if label.strip()))
    unknown = [label for label in asked if label not in known]
    if unknown:
        raise RequestError(
            422, "invalid_query", f"unknown label(s) {', '.join(map(repr, unknown))}; choose from {', '.join(known)}"
        )
    return asked


def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=code, detail=detail).model_dump(), status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def upload_error(request: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.detail)

    @app.exception_handler(ImageReadError)
    async def unreadable(request: Request, exc: ImageReadError) -> JSONResponse:
        # The problem only: the source label is the client's file name, which may name the patient.
        return _error(422, "unreadable_image", exc.problem)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{' '.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors()
        )
        return _error(422, "invalid_query", problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 503: "not_ready"}
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return _error(exc.status_code, code.get(exc.status_code, "http_error"), str(exc.detail), headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        # The type only: a message or traceback could quote the upload.
        log.error("internal error %s on %s %s", type(exc).__name__, request.method, request.url.path)
        return _error(500, "internal_error", "the server failed on this request; see its log")
