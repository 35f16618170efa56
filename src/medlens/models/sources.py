"""Where pretrained weights come from, told apart and looked for without importing torch or timm.

A ``model.pretrained`` setting is ``True`` (timm's default weights for the architecture), a hub name
(``timm/arch.tag``, or any ``org/repo``), a local file (``.safetensors``, ``.pt``, ``.pth``, ``.bin``) or
``xrv:...`` (torchxrayvision's). With what is here, :func:`medlens.models.registry.check_model` answers the
mistakes that need no weights read (a local file that is not there, hub weights that neither the network
nor the hub's local cache can give) before the model stack is imported: a second, not the ten that
importing torch and timm take on a laptop (``benchmarks/cli_errors.py``). What it cannot decide is left to
loading the weights, which checks everything.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path

from medlens.errors import ConfigError

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
XRV_PREFIX = "xrv:"
LOCAL_FILE_HINT = "model.pretrained: /path/to/weights.safetensors"
HUB_PROBE_SECONDS = 1.0


def is_xrv(pretrained: object) -> bool:
    return isinstance(pretrained, str) and pretrained.startswith(XRV_PREFIX)


def is_weights_file(pretrained: object) -> bool:
    """Whether a ``pretrained`` setting names a local file (or ``xrv:...``) rather than ``True`` or a hub name."""
    if isinstance(pretrained, Path):
        return True
    if not isinstance(pretrained, str):
        return False
    return is_xrv(pretrained) or pretrained.lower().endswith(WEIGHT_SUFFIXES) or Path(pretrained).expanduser().is_file()


def hub_model_name(timm_name: str, hub_name: str | None) -> tuple[str, dict[str, str] | None]:
    """timm's ``arch.tag`` for ``timm/arch.tag`` (so its own normalisation applies), else a repo overlay."""
    if hub_name is None:
        return timm_name, None
    repo = hub_name.removeprefix("hf-hub:")
    if repo.count("/") != 1:
        raise ConfigError(
            f"pretrained {hub_name!r} is neither a local weights file ({', '.join(WEIGHT_SUFFIXES)}) "
            f"nor a hub name like 'timm/{timm_name}.<tag>'"
        )
    org, model = repo.split("/")
    if org != "timm":
        return timm_name, {"hf_hub_id": repo}
    if model.split(".")[0] != timm_name:
        raise ConfigError(f"pretrained {hub_name!r} holds weights for {model.split('.')[0]}, not {timm_name}")
    return model, None


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """False when offline mode is on or a TCP connection to the hub (or the https proxy) fails in time."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        return False
    proxy = urllib.request.getproxies().get("https")
    url = urllib.parse.urlsplit(proxy or constants.ENDPOINT)
    address = (url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
    connected: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            connected.append(True)
        except OSError:
            pass

    # A thread, because name resolution ignores the socket timeout and can hang far longer.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(connected)


def use_hub_offline() -> None:
    """Stop the hub client from retrying a network that is not there (for this process and its children)."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        log.warning("the Hugging Face hub is unreachable: switching it to offline mode for this process")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def in_hub_cache(repo: str) -> bool:
    """Whether the hub's local cache holds a snapshot of the model ``repo`` (its folder layout)."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())
