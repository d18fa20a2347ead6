"""Offline mode and the hubs: never touch the network when told not to, and fail in seconds when a
hub cannot be reached."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

from surgery.errors import BuildError
from surgery.schema import Backbone

HUB_PROBE_TIMEOUT_S = 3.0


def is_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / SURGERY_OFFLINE say: never touch the network."""
    return any(
        os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "SURGERY_OFFLINE")
    )


_REACHABLE: dict[str, bool] = {}


def host_reachable(url: str) -> bool:
    """A quick TCP connect, so an unreachable hub fails in seconds instead of after retries."""
    host = urlparse(url).hostname or url
    if host not in _REACHABLE:
        try:
            socket.create_connection((host, 443), timeout=HUB_PROBE_TIMEOUT_S).close()
            _REACHABLE[host] = True
        except OSError:
            _REACHABLE[host] = False
    return _REACHABLE[host]


def hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def offline_error(spec: Backbone, why: str) -> BuildError:
    return BuildError(
        f"cannot fetch pretrained weights for {spec.source} backbone {spec.name!r} ({why}); "
        f"download them where there is network, set `backbone.weights:` to a local file, or set `pretrained: false` for random initialisation"
    )


@contextmanager
def hf_offline_mode() -> Iterator[None]:
    """Make huggingface_hub use its cache only (it reads the flag at import time, so patch it too)."""
    import huggingface_hub.constants as hf_constants

    old_env, old_const = os.environ.get("HF_HUB_OFFLINE"), hf_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def hub_errors() -> tuple[type[BaseException], ...]:
    """What a hub download raises when the network or the cache fails it."""
    from urllib.error import URLError

    errors: list[type[BaseException]] = [OSError, URLError, ConnectionError, TimeoutError, RuntimeError]
    try:
        import huggingface_hub.errors as hf_errors

        errors.append(hf_errors.HfHubHTTPError)
        errors.append(hf_errors.LocalEntryNotFoundError)
    except ImportError:  # pragma: no cover - very old huggingface_hub
        pass
    return tuple(errors)
