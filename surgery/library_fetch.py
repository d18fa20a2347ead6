"""Fetching what a library or a shared model points at: plain http(s) GETs with a timeout and a
size limit, streamed, and the hash everything fetched is checked by. Also the error every part
of the library raises, so that callers (the recipe loader, `extends`) can say where a reference
came from. No torch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError

FETCH_TIMEOUT_S = 20.0


class LibraryError(SurgeryError):
    """A reference that resolves to nothing, or a library or file that fails verification."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def fetch(url: str, limit: int) -> bytes:
    """GET `url` (http/https only), refusing bodies over `limit` bytes."""
    buffer = bytearray()
    _download(url, limit, buffer.extend)
    return bytes(buffer)


def fetch_to_file(url: str, path: Path, limit: int) -> None:
    """GET `url` into `path`, streamed, refusing bodies over `limit` bytes."""
    with Path(path).open("wb") as f:
        _download(url, limit, f.write)


def _download(url: str, limit: int, sink: Any) -> None:
    import urllib.error
    import urllib.request

    if not is_url(url):
        raise LibraryError(f"{url}: only http:// and https:// URLs can be fetched")
    request = urllib.request.Request(url, headers={"User-Agent": "surgery"})
    received = 0
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as response:
            while chunk := response.read(1 << 20):
                received += len(chunk)
                if received > limit:
                    raise LibraryError(f"{url}: larger than the {limit >> 20} MiB limit; refusing it")
                sink(chunk)
    except urllib.error.HTTPError as err:
        raise LibraryError(f"{url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise LibraryError(f"{url}: cannot fetch ({reason})") from None


__all__ = ["FETCH_TIMEOUT_S", "LibraryError", "fetch", "fetch_to_file", "is_url", "sha256_bytes"]
