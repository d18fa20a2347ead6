"""The libraries a user added (`surgery recipes add-source`), kept in order in the config folder's
sources.json, and the order every name is looked up in: the shipped library, then each source.
No torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError
from surgery.files import write_json_atomic
from surgery.library_fetch import LibraryError, is_url
from surgery.library_index import Library, folder_library, shipped_library
from surgery.library_remote import forget, remote_library
from surgery.places import sources_file


def configured_sources() -> list[dict[str, Any]]:
    """The sources added with `surgery recipes add-source`, in order."""
    path = sources_file()
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LibraryError(f"{path}: unreadable ({err}); fix or delete it") from None
    sources = data.get("sources") if isinstance(data, dict) else None
    if not isinstance(sources, list) or not all(isinstance(s, dict) and "location" in s for s in sources):
        raise LibraryError(f"{path}: expected {{'sources': [{{'location': ...}}, ...]}}; fix or delete it")
    return sources


def open_source(source: dict[str, Any]) -> Library:
    """A configured source (a folder or a URL) opened as a library."""
    location = str(source["location"])
    if is_url(location):
        return remote_library(location, allow_unsigned=bool(source.get("allow_unsigned")))
    return folder_library(Path(location))


def add_source(location: str, *, allow_unsigned: bool = False) -> Library:
    """`surgery recipes add-source`: check the library can be read now, then remember it."""
    if not is_url(location):
        location = str(Path(location).expanduser().resolve())
    source = {"location": location, "allow_unsigned": allow_unsigned}
    library = open_source(source)
    sources = [s for s in configured_sources() if s["location"] != location] + [source]
    write_json_atomic(sources_file(), {"sources": sources})
    return library


def remove_source(location: str) -> None:
    """`surgery recipes remove-source`."""
    sources = configured_sources()
    wanted = location if is_url(location) else str(Path(location).expanduser().resolve())
    kept = [s for s in sources if s["location"] not in (location, wanted)]
    if len(kept) == len(sources):
        raise LibraryError(f"{location}: not a configured source (`surgery recipes sources` lists them)")
    write_json_atomic(sources_file(), {"sources": kept})
    if is_url(location):
        forget(location)  # added again, it starts from whatever index it serves then


def libraries(notes: list[str] | None = None) -> Iterator[Library]:
    """The shipped library, then each configured source, opened lazily in order. A source that
    cannot be opened stops a lookup (so a name is never taken from a later library by mistake),
    unless `notes` is given: listing then goes on, and the source's problem is noted there."""
    yield shipped_library()
    for source in configured_sources():
        try:
            library = open_source(source)
        except SurgeryError as err:
            if notes is None:
                raise
            notes.append(f"note: {source['location']}: {err}")
            continue
        yield library


__all__ = ["add_source", "configured_sources", "libraries", "open_source", "remove_source"]
