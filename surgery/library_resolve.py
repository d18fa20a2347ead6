"""Resolving a recipe reference — how a user names a recipe, on the command line or in
`extends:` — to a local file to read, and where it came from:

- a path (`my.yaml`, `../base.yaml`), relative to the file that names it (or the current folder);
- a name (`quickstart`): looked up in every library, the shipped one and then the configured
  sources in the order they were added; the newest version wins, across libraries (on a tie, the
  library searched first);
- `name@version`: exactly that version, from the first library that has it.

A recipe from a library may only extend recipes of that same library (by name, or by a relative
path without `..`) and, by name, the shipped recipes; the paths it names (data, weights) must stay
inside its library (`confine_paths`). Resolving reads no recipe: the recipe loader sits above this.
No torch.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from surgery.files import sha256_file
from surgery.library_fetch import LibraryError
from surgery.library_index import NAME, VERSION, Entry, Library, safe_relative, shipped_library, version_key
from surgery.library_sources import libraries
from surgery.registry import did_you_mean

REFERENCE = re.compile(rf"^(?P<name>{NAME})(?:@(?P<version>{VERSION}))?$")


@dataclass(frozen=True)
class Resolved:
    """What a reference resolved to: a local file to read, and where it came from."""

    path: Path
    reference: str
    source: str  # "file", "shipped", a folder or a URL
    sha256: str
    name: str | None = None
    version: str | None = None
    library: Library | None = field(default=None, compare=False)
    entry_path: str | None = None  # the recipe's path inside its library

    @property
    def root(self) -> Path | None:
        """The library folder the file lies in (for a remote library, its verified cached copy)."""
        if self.library is None or self.entry_path is None:
            return None
        return self.path.parents[len(PurePosixPath(self.entry_path).parts) - 1]

    def line(self) -> str:
        """One provenance line, as `recipe.lock.yaml` records it."""
        what = f"{self.name}@{self.version}" if self.name else self.reference
        where = f"{self.source} {self.entry_path}" if self.library is not None else f"file {self.path}"
        return f"{what} ({where}) sha256:{self.sha256}"


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.sep in text or REFERENCE.match(text.removesuffix(".yaml")) is None


def from_library(library: Library, entry: Entry, reference: str) -> Resolved:
    """An entry of a library as what a reference resolved to (its file fetched and verified)."""
    return Resolved(
        path=library.materialize(entry),
        reference=reference,
        source=library.label,
        sha256=entry.sha256,
        name=entry.name,
        version=entry.version,
        library=library,
        entry_path=entry.path,
    )


def resolve(reference: str, base_dir: Path, within: Resolved | None = None) -> Resolved:
    """Resolve a reference: a path relative to `base_dir`, a shipped or configured name, or
    `name@version`. Inside a library (`within` came from one), only that library is searched."""
    if within is not None and within.library is not None:
        return _resolve_within(reference, within)
    candidate = (Path(base_dir) / Path(reference).expanduser()).resolve()
    if candidate.is_file():
        return Resolved(candidate, reference, "file", sha256_file(candidate))
    if _looks_like_path(reference):
        if candidate.is_dir():
            raise LibraryError(f"{reference} is a folder, not a recipe file")
        raise LibraryError(f"no such recipe file {reference!r}{_hint(reference)}")
    match = REFERENCE.match(reference.removesuffix(".yaml"))  # `quickstart.yaml` names it too
    assert match is not None
    name, version = match["name"], match["version"]
    searched = []
    newest: tuple[Library, Entry] | None = None
    for library in libraries():
        searched.append(library.label)
        entry = library.find(name, version)
        if entry is not None and version is not None:
            return from_library(library, entry, reference)
        if entry is not None and (newest is None or version_key(entry.version) > version_key(newest[1].version)):
            newest = (library, entry)
    if newest is not None:
        return from_library(*newest, reference)
    wanted = f"{name}@{version}" if version else name
    no_file = f"no such recipe file {reference!r}, and " if reference.endswith(".yaml") else ""
    raise LibraryError(f"{no_file}no recipe {wanted!r} in the libraries (searched: {', '.join(searched)}){_hint(name)}")


def _hint(name: str) -> str:
    names = sorted({e.name for e in shipped_library().entries})
    return did_you_mean(Path(name).stem, names) or (f"; shipped recipes: {', '.join(names)}" if names else "")


def _resolve_within(reference: str, within: Resolved) -> Resolved:
    library = within.library
    assert library is not None and within.entry_path is not None
    label = f"a recipe of library {library.label}"
    if _looks_like_path(reference):
        if os.path.isabs(os.path.expanduser(reference)) or ".." in PurePosixPath(reference).parts:
            raise LibraryError(
                f"{reference!r}: {label} may only extend recipes of its own library (no absolute paths, no ..)"
            )
        rel = safe_relative(reference, label)
        entry = library.at_path(PurePosixPath(within.entry_path).parent / rel)
        if entry is None:
            raise LibraryError(f"{reference!r}: no such recipe in library {library.label}")
        return from_library(library, entry, reference)
    match = REFERENCE.match(reference.removesuffix(".yaml"))
    assert match is not None
    entry = library.find(match["name"], match["version"]) or library.at_path(
        PurePosixPath(within.entry_path).parent / reference
    )
    if entry is not None:
        return from_library(library, entry, reference)
    shipped = shipped_library().find(match["name"], match["version"])
    if shipped is not None:
        return from_library(shipped_library(), shipped, reference)
    raise LibraryError(
        f"{reference!r}: no such recipe in library {library.label} or the shipped ones "
        "(a library's recipes may only extend its own and the shipped recipes)"
    )


__all__ = ["REFERENCE", "Resolved", "from_library", "resolve"]
