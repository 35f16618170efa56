"""schemathesis against the served OpenAPI, a short run (the long one: scripts/api_fuzz.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "api_fuzz.py"


@pytest.mark.slow
def test_generated_requests_get_no_server_error_and_documented_answers(tmp_path):
    command = [sys.executable, str(SCRIPT), "--examples", "60"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-6000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["cases"] >= 200
    assert not [status for status in summary["statuses"] if status.startswith("5")]
