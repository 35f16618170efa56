"""The house's shape: imports run one way (no circles, no layer importing one above it), and importing medlens
or loading a checkpoint changes nothing in the process."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "medlens"

LAYERS = (
    ("errors", "io", "runs", "runtime", "extras"),
    ("data", "ood"),
    ("config", "configs"),
    ("evaluation",),
    ("models", "faces"),
    ("explain",),
    ("training",),
    ("backends", "inference"),
    ("reports",),
    ("jobs", "serve"),
    ("cli", "cli_examples", "__main__"),
)
"""Bottom to top, as docs/architecture.md draws them: a module imports from its own layer and the ones below."""


def _modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every medlens module ``name`` imports, at the top, in functions, or under TYPE_CHECKING."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name and candidate != "medlens" and not name.startswith(candidate + "."):
                targets.add(candidate)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS and to docs/architecture.md")


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circles():
    assert _circles(_graph()) == []


def test_the_circle_finder_finds_one():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_import_goes_to_the_same_layer_or_below():
    upward = [
        f"{module} -> {target}"
        for module, targets in _graph().items()
        for target in targets
        if module != "medlens" and _layer(target) > _layer(module)
    ]
    assert upward == []


def test_the_architecture_page_names_every_layer():
    page = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    for names in LAYERS:
        for name in names:
            if name != "__main__":
                assert f"`{name}" in page, f"docs/architecture.md does not name {name}"


UNTOUCHED = """
import ctypes, json, os, sys
# medlens's dependencies set variables of their own as they load (OpenCV LD_LIBRARY_PATH, scikit-learn
# KMP_DUPLICATE_LIB_OK, timm TORCHINDUCTOR_CACHE_DIR): loaded first, so that only medlens's doing is seen.
import cv2, sklearn, timm, torch, pytorch_grad_cam
before_env = dict(os.environ)
threads = torch.get_num_threads()
import medlens, medlens.inference
model = medlens.inference.load_model(sys.argv[1])
model.predict_images([__import__("numpy").zeros((40, 40), dtype="float32")])
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(64 << 20)  # glibc's default serves a block this large by mmap, outside the heap
heap = next(line for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")).split()[0].split("-")
print(json.dumps({
    "env_changed": sorted(k for k in set(os.environ) | set(before_env) if os.environ.get(k) != before_env.get(k)),
    "threads_before": threads, "threads_after": torch.get_num_threads(),
    "block_in_heap": int(heap[0], 16) <= block < int(heap[1], 16),
}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the heap's bounds from /proc")
def test_importing_and_loading_leave_the_process_as_it_was(tmp_path):
    import torch

    from medlens.models import create_model
    from medlens.models.checkpoint import save_checkpoint

    model = create_model("tiny", num_classes=2)
    spec = {"name": "tiny", "num_classes": 2, "in_chans": 1, "head": "linear", "head_hidden": [], "head_dropout": 0}
    preprocessing = {"image_size": 32, "channels": 1, "mean": list(model.mean), "std": list(model.std)}
    manifest = {"task": "multiclass", "labels": ["a", "b"], "model": spec, "preprocessing": preprocessing}
    save_checkpoint(tmp_path / "ckpt", model, manifest)
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_", "MEDLENS"))}
    done = subprocess.run(
        [sys.executable, "-c", UNTOUCHED, str(tmp_path / "ckpt")], capture_output=True, text=True, env=env, check=True
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {
        "env_changed": [],
        "threads_before": found["threads_before"],
        "threads_after": found["threads_before"],
        "block_in_heap": False,
    }
    assert torch.get_num_threads() >= 1


TUNED = """
import ctypes, json, os
from medlens.runtime import apply_cpu_defaults
apply_cpu_defaults()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(64 << 20)
heap = next(line for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")).split()[0].split("-")
in_heap = int(heap[0], 16) <= block < int(heap[1], 16)
print(json.dumps({"policy": os.environ.get("OMP_WAIT_POLICY"), "block_in_heap": in_heap}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the heap's bounds from /proc")
def test_the_one_documented_call_tunes_the_process():
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_", "MEDLENS"))}
    done = subprocess.run([sys.executable, "-c", TUNED], capture_output=True, text=True, env=env, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"policy": "ACTIVE", "block_in_heap": True}
