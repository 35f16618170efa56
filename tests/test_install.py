"""The built wheel, installed with only its core dependencies, runs the core jobs from any folder.

Offline and quick: the wheel goes into a fresh virtual environment without pip's packages, and the core
dependency closure (the wheel's own requirements, followed recursively through the installed metadata) is
lent from this environment through a folder of links to those distributions' top-level files, named in a
.pth file. No optional package is visible there, so a command that needs one must say which extra to install.
"""

from __future__ import annotations

import email
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
OPTIONAL = ("fastapi", "uvicorn", "python_multipart", "onnx", "onnxruntime", "optuna", "dlib", "numba", "isal")
"""Modules of the extras, none of which the core install may see."""
TINY_DEMO = (
    "--set", "data.phantoms.n=32", "--set", "data.phantoms.size=64", "--set", "data.image_size=32",
    "--set", "train.epochs=1", "--set", "train.batch_size=8",
)  # fmt: skip


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A virtual environment holding the wheel and, lent from this one, only the core dependencies."""
    root = tmp_path_factory.mktemp("install")
    wheel = _build_wheel(root)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(_run(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip())
    (site / "core-dependencies.pth").write_text(f"{_link_distributions(_core_closure(wheel), root / 'deps')}\n")
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install"]
    subprocess.run([*pip, "--quiet", "--no-deps", "--no-index", str(wheel)], check=True, env=_clean_env())
    return venv


def _build_wheel(root: Path) -> Path:
    """The wheel, built from a copy of the source (setuptools' build/ in the checkout could add stale files)."""
    source = root / "source"
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    wheels = root / "wheels"
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels)]
    subprocess.run([*command, str(source)], check=True, env=_clean_env())
    (wheel,) = wheels.glob("medlens-*.whl")
    return wheel


def _requirements(requires: list[str] | None, extras: set[str]) -> list[Requirement]:
    found = []
    for line in requires or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": extra}) for extra in extras | {""}):
            found.append(requirement)
    return found


def _core_closure(wheel: Path) -> list[importlib.metadata.Distribution]:
    """This environment's distributions that the wheel's core requirements reach; each must satisfy its range."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(archive.read(name))
    pending = _requirements(metadata.get_all("Requires-Dist"), set())
    closure: dict[str, importlib.metadata.Distribution] = {}
    while pending:
        requirement = pending.pop()
        distribution = importlib.metadata.distribution(requirement.name)
        version = distribution.version
        assert requirement.specifier.contains(version, prereleases=True), f"{requirement} but {version} installed"
        key = distribution.metadata["Name"].lower()
        if key not in closure:
            closure[key] = distribution
            pending += _requirements(distribution.requires, set(requirement.extras))
    return list(closure.values())


def _link_distributions(distributions: list[importlib.metadata.Distribution], folder: Path) -> Path:
    """``folder`` holding a link to every top-level file and folder of the distributions (from their RECORD)."""
    folder.mkdir()
    for distribution in distributions:
        tops = {Path(str(f)).parts[0] for f in distribution.files or () if not str(f).startswith("..")}
        for top in tops - {"__pycache__"}:
            link = folder / top
            if not link.exists():
                link.symlink_to(distribution.locate_file(top))
    return folder


def _clean_env() -> dict[str, str]:
    """This process's environment without what would let the checkout or this venv leak in."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}
    return {**env, "HF_HUB_OFFLINE": "1", "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _run(program: Path, *args: str, cwd: Path | None = None, rc: int = 0) -> str:
    command = [str(program), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=_clean_env(), cwd=cwd, timeout=300)
    assert result.returncode == rc, f"{' '.join(command)}: exit {result.returncode}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def test_the_lock_pins_a_version_in_every_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    ranges = [*project["dependencies"], *(r for name, rs in extras.items() if name != "xrv" for r in rs)]
    pins = dict(line.split("==") for line in (REPO / "requirements.lock").read_text().split())
    pinned = {canonicalize_name(name): version for name, version in pins.items()}
    for requirement in map(Requirement, ranges):
        if requirement.name != "medlens":  # all and dev name the other extras
            version = pinned.get(canonicalize_name(requirement.name))
            assert version is not None and requirement.specifier.contains(version), (str(requirement), version)


def test_the_wheel_ships_the_configs_and_the_page(installed):
    site = Path(_run(installed / "bin" / "python", "-c", "import medlens; print(medlens.__file__)").strip()).parent
    assert site.is_relative_to(installed), site  # the wheel's medlens, not the checkout's
    assert (site / "configs" / "demo.yaml").is_file() and (site / "serve" / "static" / "index.html").is_file()
    probe = f"import importlib.util as u; print([m for m in {OPTIONAL!r} if u.find_spec(m)])"
    assert _run(installed / "bin" / "python", "-c", probe).strip() == "[]"


def test_core_jobs_run_from_any_folder(installed, tmp_path):
    medlens = installed / "bin" / "medlens"
    assert "example:" in _run(medlens, "--help", cwd=tmp_path)
    assert "cxr4 " in _run(medlens, "configs", cwd=tmp_path)
    trained = _run(medlens, "train", "demo", "--out", "run", *TINY_DEMO, cwd=tmp_path)
    assert "not exported to ONNX" in trained and "pip install 'medlens[onnx]'" in trained
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()
    _run(medlens, "evaluate", "run", "--out", "evaluation", "--resamples", "20", cwd=tmp_path)
    assert (tmp_path / "evaluation" / "report.html").is_file()
    _run(medlens, "predict", "run", "run/phantoms/images", "--out", "predictions.csv", cwd=tmp_path)
    assert len((tmp_path / "predictions.csv").read_text().splitlines()) == 33
    film = "run/phantoms/images/ph00000_000.png"
    _run(medlens, "predict", "run", film, "--out", "one.csv", "--report", "reports", "--no-pdf", cwd=tmp_path)
    assert (tmp_path / "reports" / "index.html").is_file()
    _run(medlens, "explain", "run", film, "--out", "heatmaps", cwd=tmp_path)
    assert (tmp_path / "heatmaps" / "index.html").is_file()
    assert "cached 32 images" in _run(medlens, "data", "cache", "run/phantoms", "--out", "cache", cwd=tmp_path)


@pytest.mark.parametrize(
    ("args", "extra"),
    [(("serve", "run"), "serve"), (("tune", "demo", "--out", "tune"), "tune"), (("export", "run"), "onnx")],
)
def test_a_job_without_its_extra_names_it(installed, tmp_path, args, extra):
    said = _run(installed / "bin" / "medlens", *args, cwd=tmp_path, rc=1).strip().splitlines()
    assert len(said) == 1 and f"needs the '{extra}' extra: pip install 'medlens[{extra}]'" in said[0], said
