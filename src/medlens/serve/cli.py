"""``medlens serve CHECKPOINT``: the web page and the HTTP API on one port."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from pathlib import Path

from medlens.extras import require

log = logging.getLogger(__name__)

TOKEN_ENV = "MEDLENS_TOKEN"


def add_parser(jobs: argparse._SubParsersAction) -> None:
    serve = jobs.add_parser("serve", help="serve a checkpoint: the web page and the HTTP API (/docs)")
    serve.add_argument("checkpoint", type=Path, help="run folder or checkpoint folder")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"require Authorization: Bearer TOKEN on the API (default: ${TOKEN_ENV}; the environment keeps it "
        "out of the process list)",
    )
    serve.add_argument("--max-upload-mb", type=float, default=32.0, help="largest accepted upload (default 32 MB)")
    serve.add_argument(
        "--request-timeout",
        type=float,
        default=120.0,
        help="seconds a request may queue for and use the model before it gets 503 (default 120)",
    )
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    require("fastapi", extra="serve")
    require("python_multipart", extra="serve")
    uvicorn = require("uvicorn", extra="serve")
    from medlens.serve.app import create_app

    if args.token is None and not _is_loopback(args.host):
        log.warning("serving on %s without --token: anyone who can reach this address can use the API", args.host)
    app = create_app(
        args.checkpoint,
        token=args.token,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        request_seconds=args.request_timeout,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
