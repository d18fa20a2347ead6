"""Remote libraries: static files on a web server, read through their `index.json`, which must be
fresh. Three attacks on such a library are refused here (TUF's rollback, freeze and
endless-data attacks; the last by `surgery.library_fetch`'s limits):

- **rollback**: the newest `published` date verified from each library is recorded (in the config
  folder); an index published before it, however validly signed, is refused, so a replayed old
  index cannot make newer recipes disappear;
- **freeze**: an index carries an `expires` date (`surgery recipes index --expires-days`); an
  expired one is refused when fetched, so a server cannot keep serving one frozen index forever;
- **stale fallbacks**: the index cached from the last fetch stands in only when no server answered
  (offline), and says so in one line; a server that answers with an error is an error.
No torch.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from surgery.files import write_json_atomic
from surgery.library_fetch import FetchError, LibraryError, fetch, sha256_bytes
from surgery.library_index import DATE_FORMAT, INDEX, MAX_INDEX_BYTES, Index, Library, format_date, parse_index
from surgery.places import cache_dir, seen_indexes_file

INDEX_DEADLINE_S = 60.0
MAX_CLOCK_SKEW = timedelta(days=1)  # how far in the future a publisher's clock may be
_noted: set[str] = set()  # offline notes already printed by this process


def library_base(url: str) -> str:
    """The folder URL of a library, ending in '/', however its location was written."""
    base = url if url.endswith("/") else url + "/"
    return base[: -len(INDEX) - 1] if base.endswith(INDEX + "/") else base


def remote_library(url: str, *, allow_unsigned: bool = False) -> Library:
    """A library served as static files, its index fetched, verified and judged fresh. The index
    is cached so that fetched recipes stay usable offline."""
    base = library_base(url)
    where = base + INDEX
    cached = cache_dir() / "indexes" / (sha256_bytes(base.encode()) + ".json")
    try:
        data = fetch(where, MAX_INDEX_BYTES, deadline_s=INDEX_DEADLINE_S)
    except FetchError as err:
        if not cached.is_file():
            raise
        if not err.offline:
            raise LibraryError(f"{err}; the server answered, so the index cached earlier is not used") from None
        index = parse_index(cached.read_bytes(), where, allow_unsigned=allow_unsigned, remote=True)
        _note_offline(base, err, index)
        return Library(base, "remote", index.entries, indexed=True, signed_by=index.signer)
    index = parse_index(data, where, allow_unsigned=allow_unsigned, remote=True)
    check_fresh(index, base, where, datetime.now(UTC))
    _record(base, index, sha256_bytes(data))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(cached.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, cached)
    return Library(base, "remote", index.entries, indexed=True, signed_by=index.signer)


def check_fresh(index: Index, base: str, where: str, now: datetime) -> None:
    """A fetched index must have its dates, be unexpired, not come from the future, and not be
    older than the newest one verified from this library before."""
    if index.published is None or index.expires is None:
        raise LibraryError(
            f"{where}: has no `published` and `expires` dates (an index written by an older surgery); "
            "refusing it: its publisher must run `surgery recipes index` again"
        )
    if index.published > now + MAX_CLOCK_SKEW:
        raise LibraryError(f"{where}: published in the future ({format_date(index.published)}); refusing it")
    if index.expires <= now:
        raise LibraryError(
            f"{where}: expired on {format_date(index.expires)}; refusing a stale index (it could hide newer "
            "recipes): its publisher must run `surgery recipes index` again"
        )
    seen = seen_published(base)
    if seen is not None and index.published < seen:
        raise LibraryError(
            f"{where}: published {format_date(index.published)}, older than the index already verified from "
            f"this library ({format_date(seen)}); refusing a rolled-back index (if its publisher really went "
            f"back, `surgery recipes remove-source {base}` and add it again)"
        )


def _seen() -> dict[str, Any]:
    path = seen_indexes_file()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise LibraryError(f"{path}: unreadable; delete it to start trusting indexes afresh") from None
    sources = data.get("sources") if isinstance(data, dict) else None
    return sources if isinstance(sources, dict) else {}


def seen_published(base: str) -> datetime | None:
    """The `published` date of the newest index verified from the library at `base`."""
    record = _seen().get(library_base(base))
    try:
        return datetime.strptime(record["published"], DATE_FORMAT).replace(tzinfo=UTC)
    except (TypeError, KeyError, ValueError):
        return None


def _record(base: str, index: Index, digest: str) -> None:
    assert index.published is not None  # check_fresh refused an index without it
    seen = _seen()
    record = {"published": format_date(index.published), "sha256": digest}
    if seen.get(base) == record:
        return  # nothing new: no write on every lookup
    seen[base] = record
    write_json_atomic(seen_indexes_file(), {"sources": seen}, sort_keys=True)


def forget(url: str) -> None:
    """Forget the newest index seen from a library (`surgery recipes remove-source`)."""
    seen = _seen()
    if seen.pop(library_base(url), None) is not None:
        write_json_atomic(seen_indexes_file(), {"sources": seen}, sort_keys=True)


def _note_offline(base: str, err: FetchError, index: Index) -> None:
    if base in _noted:
        return
    _noted.add(base)
    published = f", published {format_date(index.published)}" if index.published else ""
    expired = (
        f", expired on {format_date(index.expires)}"
        if index.expires is not None and index.expires <= datetime.now(UTC)
        else ""
    )
    print(f"note: {err}; offline, so using the index cached on the last fetch{published}{expired}", file=sys.stderr)


__all__ = ["INDEX_DEADLINE_S", "check_fresh", "forget", "library_base", "remote_library", "seen_published"]
