"""Whether the Hugging Face Hub can be used: offline by setting, or unreachable from this machine.

huggingface_hub and datasets retry a failing request with backoff, about half a minute per file before they give
up, so a node without network access would wait on every Hub lookup. One short connection attempt up front tells
an unreachable Hub apart; it is then treated as offline (cached files still load, anything else fails at once).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def hub_offline_by_setting() -> bool:
    return any(os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


#: How long a probe's answer stands: stages of one run share it, a long-lived worker sees the network return.
PROBE_TTL_S = 60.0
_probes: dict[str, tuple[float, Optional[str]]] = {}


def _unreachable(endpoint: str, timeout: float) -> Optional[str]:
    now = time.monotonic()
    cached = _probes.get(endpoint)
    if cached is not None and now - cached[0] < PROBE_TTL_S:
        return cached[1]
    answer = _probe(endpoint, timeout)
    _probes[endpoint] = (now, answer)
    return answer


def _probe(endpoint: str, timeout: float) -> Optional[str]:
    url = urlparse(endpoint)
    host = url.hostname or ""
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as error:
        return f"{host}:{port} unreachable ({error.strerror or type(error).__name__})"


def hub_unreachable(timeout: float = PROBE_TIMEOUT_S) -> Optional[str]:
    """Why the Hub cannot be used (offline setting, or no connection to it), or None when it may be.

    Behind a proxy the direct probe says nothing, so the Hub is assumed reachable there.
    """
    if hub_offline_by_setting():
        return "offline by setting (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)"
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None
    return _unreachable(hub_endpoint(), timeout)


_switch_lock = threading.Lock()
_switch_holders = 0
_switch_saved: list[tuple[object, str, object]] = []


@contextmanager
def offline_when_unreachable() -> Iterator[Optional[str]]:
    """Within the block, huggingface_hub and datasets run offline if the Hub cannot be reached; yields why.

    The libraries' offline flags are process-wide: threads inside such blocks at once (concurrent stages) share
    one switch, set by the first to enter and restored by the last to leave.
    """
    global _switch_holders, _switch_saved
    reason = hub_unreachable()
    if reason is None or hub_offline_by_setting():
        yield reason
        return
    with _switch_lock:
        if _switch_holders == 0:
            switches = _offline_switches()
            _switch_saved = [(module, name, getattr(module, name)) for module, name in switches]
            for module, name in switches:
                setattr(module, name, True)
        _switch_holders += 1
    try:
        yield reason
    finally:
        with _switch_lock:
            _switch_holders -= 1
            if _switch_holders == 0:
                for module, name, value in _switch_saved:
                    setattr(module, name, value)
                _switch_saved = []


def _offline_switches() -> list[tuple[object, str]]:
    """The module-level flags the two libraries read on every request (set from the environment at import)."""
    switches: list[tuple[object, str]] = []
    try:
        from huggingface_hub import constants

        switches.append((constants, "HF_HUB_OFFLINE"))
    except ImportError:
        pass
    try:
        import datasets.config

        switches += [(datasets.config, name) for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
                     if hasattr(datasets.config, name)]
    except ImportError:
        pass
    return switches
