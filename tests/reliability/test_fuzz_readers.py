"""A short coverage-guided fuzzing run of the image readers (the long one: scripts/fuzz_readers.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fuzz_readers.py"
RUNS = 2000


@pytest.mark.slow
def test_fuzzed_png_jpeg_and_dicom_only_ever_raise_image_read_error(tmp_path):
    # Seeded from ../shared/data where present, else from the generated DICOMs alone.
    command = [sys.executable, str(SCRIPT), "--runs", str(RUNS), "--max-seconds", "60", "--seed", "1"]
    command += ["--corpus", str(tmp_path / "corpus"), "--artifacts", str(tmp_path / "artifacts")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    log = result.stdout + result.stderr
    crashes = sorted(p.name for p in (tmp_path / "artifacts").iterdir())
    assert result.returncode == 0 and not crashes, f"{crashes}\n{log[-4000:]}"
    executed = re.search(r"stat::number_of_executed_units: (\d+)", log)
    assert executed and int(executed.group(1)) >= RUNS // 4, log[-2000:]  # a slow machine may hit the time cap
