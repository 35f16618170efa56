"""Load the full NIH metadata (112,120 rows) and split it by patient: seconds and peak memory.

Run from the repo root: `.venv/bin/python benchmarks/nih_index.py`. Each repeat runs in a fresh process so
the peak RSS is that of one load + split. Goal: <= 2 s and <= 500 MB.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SOURCE = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nih-metadata" / "Data_Entry_2017_v2020.csv.gz"
)


def once() -> dict[str, float]:
    start = time.perf_counter()
    from medlens.data.records import load_source
    from medlens.data.splits import check_no_leakage, patient_split

    imported = time.perf_counter()
    table = load_source(SOURCE)
    splits = patient_split(table, seed=0)
    check_no_leakage(table, splits)
    done = time.perf_counter()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": done - imported, "import_seconds": imported - start, "rss_mb": rss_mb, "rows": len(table)}


def main(repeats: int = 5) -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(once()))
        return
    if not SOURCE.exists():
        sys.exit(f"{SOURCE} is absent: this benchmark needs ../shared/data")
    runs = [
        json.loads(
            subprocess.run([sys.executable, __file__, "--child"], capture_output=True, text=True, check=True).stdout
        )
        for _ in range(repeats)
    ]
    seconds = [r["seconds"] for r in runs]
    rss = [r["rss_mb"] for r in runs]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"rows {runs[0]['rows']:,}; load + patient split + leakage check, {repeats} fresh processes")
    print(f"seconds min/median/max {min(seconds):.3f}/{statistics.median(seconds):.3f}/{max(seconds):.3f} (goal <= 2)")
    print(f"peak RSS MB min/median/max {min(rss):.0f}/{statistics.median(rss):.0f}/{max(rss):.0f} (goal <= 500)")
    print(f"(library import, not counted: median {statistics.median(r['import_seconds'] for r in runs):.2f} s)")
    print(json.dumps({"seconds": round(statistics.median(seconds), 3), "rss_mb": round(statistics.median(rss), 1)}))


if __name__ == "__main__":
    main()
