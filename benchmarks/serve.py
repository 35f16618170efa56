"""What serving costs: latency and throughput of POST /predict next to the model's own batch-1 forward pass.

Starts ``medlens.serve`` under uvicorn in a child process on 127.0.0.1 (a free port; loopback only) and
uploads the same real NIH film (1024 x 1024 PNG) for ``--seconds`` per phase:

- ``plain`` and ``cam``: 1 and ``--clients`` concurrent clients, without and with heatmaps;
- ``soak``: ``--soak-clients`` (8) clients without heatmaps for ``--soak-seconds`` (60), then stop: the
  server's memory sampled every second, its growth over the phase, and p95 over p50 (goals: < 5%, <= 3);
- ``p50_over_forward_ms``: the 1-client latency without heatmaps minus the batch-1 forward pass the server
  timed during those same requests (``timings_ms.forward``: the model alone, same process, same moment):
  what serving adds to a request, whatever the model (goal <= 8 ms); ``p50_vs_forward`` is their ratio.
  The forward pass is also timed in this process before and after that phase, the server idle, but on a
  shared 2-core machine other jobs' load swings such separate timings by 10x or more (torch's two OpenMP
  threads wait on each other whenever one loses its core), so they are printed for reference only.

    .venv/bin/python benchmarks/serve.py [--checkpoint RUN] [--model resnet50] [--clients 4] [--seconds 20]
                                         [--soak-clients 8] [--soak-seconds 60] [--backend torch]

``--backend onnxruntime`` serves the checkpoint's ONNX export (made first if absent), as a checkpoint from
``medlens train`` is served by default wherever ONNX Runtime measured faster.

Memory is measured after a warm-up at the highest concurrency with heatmaps: "flat" means a server under a
steady load stops growing, not that 8 clients in flight cost no more than 1.

Without ``--checkpoint`` a randomly initialised ``--model`` checkpoint with the 14 NIH labels at 224 px is
written to a temporary folder (weights do not change the cost). Prints the machine, a table per phase and,
as the very last line, one JSON object with ``p50_over_forward_ms`` (goal <= 8), ``p50_vs_forward``, ``errors``,
``memory_growth_pct``, ``soak_p95_vs_p50``, ``soak_memory_growth_pct`` and the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common  # noqa: F401  (first: applies the CPU tuning before torch loads)
import httpx
import numpy as np
from common import SHARED, machine, random_checkpoint

from medlens.backends import BACKEND_ENV
from medlens.inference import NetworkModel, load_model
from medlens.jobs.export import export_onnx
from medlens.models.checkpoint import read_manifest
from medlens.runtime import apply_cpu_defaults
from medlens.serve.background import LOOPBACK, free_port

IMAGE = SHARED / "nih14" / "images" / "00000061_012.png"
SERVER = """
import sys, uvicorn
from medlens.serve.app import create_app
uvicorn.run(create_app(sys.argv[1]), host=sys.argv[2], port=int(sys.argv[3]), log_level="warning")
"""


def wait_until_up(base: str, server: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit(f"the server did not answer {base}/health within {timeout:.0f} s")


class Samples:
    """Client-side latencies, the server's own step timings, and errors, from any number of threads."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.steps: dict[str, list[float]] = {}
        self.errors = 0
        self.lock = threading.Lock()

    def post(self, http: httpx.Client, image: bytes, cam: bool) -> None:
        start = time.perf_counter()
        try:
            response = http.post(f"/predict?cam={str(cam).lower()}", files={"file": ("film.png", image, "image/png")})
            timings = response.json()["timings_ms"] if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError):
            timings = None
        elapsed = (time.perf_counter() - start) * 1e3
        with self.lock:
            if timings is None:
                self.errors += 1
                return
            self.latencies.append(elapsed)
            for step, ms in timings.items():
                self.steps.setdefault(step, []).append(ms)

    def summary(self, wall: float) -> dict[str, float]:
        values = np.asarray(self.latencies or [float("nan")])
        return {
            "requests_per_s": round(len(self.latencies) / wall, 2),
            "p50_ms": round(float(np.percentile(values, 50)), 1),
            "p95_ms": round(float(np.percentile(values, 95)), 1),
            "requests": len(self.latencies),
            "errors": self.errors,
            **{f"server_{step}_ms": round(statistics.median(ms), 1) for step, ms in self.steps.items()},
        }


def drive(base: str, image: bytes, clients: int, seconds: float, cam: bool) -> dict[str, float]:
    """``clients`` threads posting ``image`` back to back for ``seconds``."""
    samples = Samples()
    deadline = time.monotonic() + seconds

    def client() -> None:
        with httpx.Client(base_url=base, timeout=120.0) as http:
            while time.monotonic() < deadline:
                samples.post(http, image, cam)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return samples.summary(time.monotonic() - began)


class MemoryWatch:
    """The resident memory of a process, sampled every ``interval`` seconds in a thread while in use."""

    def __init__(self, pid: int, interval: float = 1.0):
        self.pid, self.interval = pid, interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(rss_mb(self.pid))

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.samples.append(rss_mb(self.pid))
            self._stop.wait(self.interval)


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (Linux /proc), NaN where that is not readable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def forward_ms(predictor: NetworkModel, repeats: int = 15) -> float:
    """Median batch-1 forward pass in this process, in ms, after the server has been idle for a second.

    Idle first: OpenMP threads spin for a while after each parallel region, and the server's spinning
    threads would otherwise slow this process down (and this one's the server).
    """
    x = predictor.to_tensor([predictor.read(IMAGE)])
    time.sleep(1.0)
    for _ in range(3):
        predictor.forward(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.forward(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="run or checkpoint folder (default: a random --model)")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--backend",
        choices=("torch", "onnxruntime"),
        default="torch",
        help="the server's backend; onnxruntime exports the checkpoint first if it has no export, as training does",
    )
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each load phase")
    parser.add_argument("--soak-clients", type=int, default=8)
    parser.add_argument("--soak-seconds", type=float, default=60.0, help="length of the soak phase (0: none)")
    args = parser.parse_args()
    if not IMAGE.is_file():
        raise SystemExit(f"{IMAGE} is absent: the benchmark uploads a real NIH film from ../shared/data")

    apply_cpu_defaults()
    with tempfile.TemporaryDirectory(prefix="medlens-bench-") as scratch:
        checkpoint = args.checkpoint or random_checkpoint(Path(scratch), args.model, args.size)
        if args.backend == "onnxruntime" and "onnx" not in read_manifest(checkpoint):
            export_onnx(checkpoint, [IMAGE])
        os.environ[BACKEND_ENV] = args.backend  # this process's model and the server's
        predictor = load_model(checkpoint)
        print(machine())
        print(
            f"{predictor.manifest['model']['name']} at {predictor.image_size} px on {predictor.backend}, "
            f"{len(predictor.labels)} labels; "
            f"upload {IMAGE.name} ({IMAGE.stat().st_size:,} bytes); {args.seconds:.0f} s per phase\n"
        )
        port = free_port()
        base = f"http://{LOOPBACK}:{port}"
        server = subprocess.Popen([sys.executable, "-c", SERVER, str(checkpoint), LOOPBACK, str(port)])
        try:
            wait_until_up(base, server)
            image = IMAGE.read_bytes()
            heaviest = max(args.clients, args.soak_clients)
            drive(base, image, heaviest, 6.0, cam=True)  # warm-up: the allocator reaches its working size
            drive(base, image, heaviest, 3.0, cam=False)
            rss_start = rss_mb(server.pid)
            before = forward_ms(predictor)
            phases = {"plain_1": drive(base, image, 1, args.seconds, cam=False)}
            time.sleep(1.0)
            after = forward_ms(predictor)
            for cam in (False, True):
                for clients in sorted({1, args.clients}):
                    name = f"{'cam' if cam else 'plain'}_{clients}"
                    if name not in phases:
                        phases[name] = drive(base, image, clients, args.seconds, cam)
            rss_end = rss_mb(server.pid)
            if args.soak_seconds > 0:
                with MemoryWatch(server.pid) as soak_memory:
                    phases[f"soak_{args.soak_clients}"] = drive(
                        base, image, args.soak_clients, args.soak_seconds, cam=False
                    )
        finally:
            server.terminate()
            server.wait(timeout=30)

    steps = ("read", "preprocess", "ood", "queue", "forward", "cam", "total")
    print(f"{'phase':<8}{'clients':>8}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'errors':>7}   server medians, ms: "
          + " / ".join(steps))  # fmt: skip
    for name, figures in phases.items():
        kind, clients = name.split("_")
        server_steps = " / ".join(f"{figures.get(f'server_{step}_ms', float('nan')):.1f}" for step in steps)
        print(
            f"{kind:<8}{clients:>8}{figures['requests_per_s']:>8.2f}{figures['p50_ms']:>9.1f}{figures['p95_ms']:>9.1f}"
            f"{figures['errors']:>7}   {server_steps}"
        )
    single = phases["plain_1"]
    forward = single["server_forward_ms"]
    print(
        f"\nbatch-1 forward pass: {forward:.1f} ms in the server during the 1-client phase (median); "
        f"{before:.1f} ms before it and {after:.1f} ms after it in this process, the server idle"
    )
    overhead = single["p50_ms"] - forward
    print(f"1-client p50 {single['p50_ms']:.1f} ms: {overhead:.1f} ms over the forward pass (goal <= 8)")
    growth = 100 * (rss_end - rss_start) / rss_start
    print(f"server memory: {rss_start:.0f} MB after warm-up, {rss_end:.0f} MB after the phases ({growth:+.1f}%)")
    soak: dict[str, float] = {}
    if args.soak_seconds > 0:
        figures, memory = phases[f"soak_{args.soak_clients}"], soak_memory.samples
        soak = {
            "soak_p95_vs_p50": round(figures["p95_ms"] / figures["p50_ms"], 3),
            "soak_memory_growth_pct": round(100 * (memory[-1] - memory[0]) / memory[0], 2),
        }
        print(
            f"soak, {args.soak_clients} clients for {args.soak_seconds:.0f} s: p95 {soak['soak_p95_vs_p50']:.2f}x p50; "
            f"memory {memory[0]:.0f} -> {max(memory):.0f} (peak) -> {memory[-1]:.0f} MB after it "
            f"({soak['soak_memory_growth_pct']:+.1f}%)"
        )
    summary = {
        "p50_over_forward_ms": round(overhead, 1),
        "p50_vs_forward": round(single["p50_ms"] / forward, 3),
        "memory_growth_pct": round(growth, 2),
        **soak,
        "errors": sum(figures["errors"] for figures in phases.values()),
        "forward_ms": forward,
        "forward_ms_here_before": round(before, 1),
        "forward_ms_here_after": round(after, 1),
        **{f"{name}_{key}": value for name, figures in phases.items() for key, value in figures.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
