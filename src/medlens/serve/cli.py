"""``medlens serve CHECKPOINT``: the web page and the HTTP API on one port."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
from pathlib import Path

from medlens.errors import UsageError
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
    serve.add_argument("--device", default="auto", help="where the model runs: auto (default), cpu, cuda, cuda:N, mps")
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    require("fastapi", extra="serve")
    require("python_multipart", extra="serve")
    uvicorn = require("uvicorn", extra="serve")
    from medlens.serve.app import create_app

    check_port(args.host, args.port)
    from medlens.training.engine import resolve_device

    resolve_device(args.device)  # a device that is not there is a one-line error now, not at startup
    if args.token is None and not _is_loopback(args.host):
        log.warning("serving on %s without --token: anyone who can reach this address can use the API", args.host)
    app = create_app(
        args.checkpoint,
        token=args.token,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        request_seconds=args.request_timeout,
        device=args.device,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def check_port(host: str, port: int) -> None:
    """:class:`UsageError` naming the address when the server could not listen there (in use, not this machine's)."""
    if not 0 < port < 65536:
        raise UsageError(f"--port {port} is not a TCP port: choose one in 1-65535")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror}): choose another --port or --host") from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
