"""schemathesis against the served OpenAPI: generated requests to every operation of a live server.

The server runs under uvicorn on 127.0.0.1 (a free port) in this process, over ``--checkpoint`` or, by
default, a tiny model trained for one epoch on phantoms. Each operation gets ``--examples`` positive
cases (valid per the schema: query values, multipart bodies of random bytes) and as many negative ones
(values the schema forbids). Every response is checked: no 5xx, the status is one the schema documents,
and the body matches the schema of that status (``ErrorResponse`` for every error).

    .venv/bin/python scripts/api_fuzz.py --examples 300

The last line printed is a JSON summary; the exit status is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup

from medlens.serve.app import create_app
from medlens.serve.background import serve_in_thread

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
TINY_RUN = ["model.name=tiny", "data.image_size=64", "data.phantoms.n=64", "data.phantoms.size=128", "train.epochs=1"]


def tiny_checkpoint(folder: Path) -> Path:
    from medlens.config import load_config
    from medlens.jobs.train import train

    run = folder / "run"
    train(load_config(None, TINY_RUN), run, progress=False)
    return run


def live_server(checkpoint: Path) -> AbstractContextManager[str]:
    """The app over ``checkpoint`` under uvicorn on 127.0.0.1, in a thread; yields its base URL."""
    return serve_in_thread(create_app(checkpoint), log_level="warning")


def fuzz(base_url: str, examples: int, random_seed: int) -> tuple[Counter, list[str]]:
    """Run the cases; returns (operation, mode, status) counts and one message per failed operation and mode."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    counts: Counter = Counter()
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in GenerationMode:
            try:
                seed(random_seed)(_cases(operation, mode, examples, counts))()
            except Unsatisfiable:
                continue  # no parameters to get wrong: an operation without inputs has no negative cases
            except (FailureGroup, Exception) as exc:  # a failed check: what failed, and a curl command
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    return counts, failures


def _cases(operation: APIOperation, mode: GenerationMode, examples: int, counts: Counter) -> Callable[[], None]:
    """A Hypothesis test sending ``examples`` generated requests to ``operation``, counting their statuses."""

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],  # every case counts once: no shrinking replays
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def send(case: schemathesis.Case) -> None:
        response = case.call(timeout=120)
        counts[(operation.label, mode.value, response.status_code)] += 1
        case.validate_response(response, checks=CHECKS)

    return send


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=300, help="cases per operation and generation mode")
    parser.add_argument("--checkpoint", type=Path, help="run or checkpoint folder (default: train a tiny one)")
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis seed, for a repeatable run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="medlens-api-fuzz-") as tmp:
        checkpoint = args.checkpoint or tiny_checkpoint(Path(tmp))
        trained = time.monotonic()
        with live_server(checkpoint) as base_url:
            counts, failures = fuzz(base_url, args.examples, args.seed)
    for (operation, mode, status), n in sorted(counts.items()):
        print(f"{operation:<16} {mode:<9} {status}  {n}")
    for failure in failures:
        print(f"\nFAILED {failure}", file=sys.stderr)
    statuses = Counter()
    for (_, _, status), n in counts.items():
        statuses[str(status)] += n
    summary = {
        "cases": sum(counts.values()),
        "statuses": dict(sorted(statuses.items())),
        "failed_operations": len(failures),
        "fuzz_seconds": round(time.monotonic() - trained, 1),
        "total_seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
