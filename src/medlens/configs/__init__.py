"""The ready configs, shipped inside the package and addressed by name: ``medlens train cxr4`` reads cxr4.yaml here.

A config argument is a path when such a file exists, else the name of a shipped config; ``medlens configs``
lists them with the first comment line of each, which says what the config is for.
"""

from __future__ import annotations

from pathlib import Path

from medlens.errors import ConfigError

FOLDER = Path(__file__).resolve().parent
SUFFIX = ".yaml"


def shipped_configs() -> dict[str, Path]:
    """Every shipped config by name (its file name without ``.yaml``), sorted."""
    return {path.stem: path for path in sorted(FOLDER.glob(f"*{SUFFIX}"), key=lambda path: path.stem)}


def find_config(config: str | Path) -> Path:
    """The YAML file ``config`` names: an existing file, else a shipped config's name (``cxr4`` or ``cxr4.yaml``)."""
    path = Path(config)
    if path.exists() and not path.is_dir():  # not only regular files: /dev/null, a shell's <(...) pipe
        return path
    shipped = shipped_configs()
    name = path.name.removesuffix(SUFFIX) if path.parent == Path() else None
    if name in shipped:
        return shipped[name]
    raise ConfigError(
        f"config {str(config)!r} is neither a file nor a shipped config; shipped configs: {', '.join(shipped)} "
        "(medlens configs says what each is for)"
    )


def purpose(path: Path) -> str:
    """The first comment line of a config file, which says what it is for ('' if it starts with none)."""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped:
            return stripped.removeprefix("#").strip() if stripped.startswith("#") else ""
    return ""
