"""Libraries and their entries: what recipes a folder of recipe files (shipped, local or remote)
holds, and a verified local copy of one of them.

A folder with an `index.json` (written by `surgery recipes index`) is read through it: each entry
lists the recipe's name, version, sha256 and the files it needs, and the whole index may carry an
Ed25519 signature (`surgery.keys`). A local folder without an index is scanned for `*.yaml`,
reading only the fields each file writes itself (never loading a recipe); every file of a folder
library is read only where it stays inside the folder with symlinks resolved. A remote library's
files are fetched into the cache by content hash and checked against its index before anything
reads them (its index is fetched and judged by `surgery.library_remote`). No torch.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from surgery import __version__
from surgery.errors import SurgeryError
from surgery.files import sha256_file
from surgery.keys import read_signed_document
from surgery.library_fetch import LibraryError, fetch, sha256_bytes
from surgery.places import SHIPPED_DIR, cache_dir
from surgery.recipe_yaml import read_fields

INDEX = "index.json"
INDEX_FORMAT = "surgery-library"
INDEX_FORMAT_VERSION = 1
INDEX_EXPIRES_DAYS = 90  # how long `surgery recipes index` makes an index valid, unless told
DATE_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
MAX_INDEX_BYTES = 4 << 20
MAX_RECIPE_BYTES = 1 << 20
MAX_FILE_BYTES = 64 << 20  # a data file shipped with a recipe (the library holds no weights)
DEFAULT_VERSION = "0"

NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
VERSION = r"[A-Za-z0-9][A-Za-z0-9._+-]*"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def safe_relative(rel: str, what: str) -> PurePosixPath:
    """`rel` as a relative POSIX path that stays inside its folder, else a LibraryError."""
    if not isinstance(rel, str) or not rel:
        raise LibraryError(f"{what}: {rel!r} is not a relative path")
    path = PurePosixPath(rel)
    if "\\" in rel or path.is_absolute() or ".." in path.parts or rel.startswith("~"):
        raise LibraryError(
            f"{what}: {rel!r} is not a plain relative path inside the library (no absolute paths, no ..)"
        )
    return path


def inside_library(root: Path, rel: str, what: str) -> Path:
    """`root/rel`, refused unless it stays inside `root` with every symlink on the way resolved
    (a folder of the library may be a link to anywhere)."""
    path = root.joinpath(*safe_relative(rel, what).parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise LibraryError(f"{what}: {rel!r} leads outside the library (through a symlink); refusing it")
    return path


# --------------------------------------------------------------------------- entries and libraries


@dataclass(frozen=True)
class Entry:
    """One recipe of a library."""

    name: str
    version: str
    path: str  # POSIX, relative to the library root
    sha256: str
    files: dict[str, str] = field(default_factory=dict, hash=False)  # every file it needs, recipe included
    description: str = ""
    tags: tuple[str, ...] = ()


@dataclass
class Library:
    """A shipped, local-folder or remote library and its recipes."""

    location: str  # "shipped", a folder's absolute path, or a URL ending in "/"
    kind: str  # "shipped" | "folder" | "remote"
    entries: list[Entry]
    root: Path | None = None  # local folder (None for remote)
    indexed: bool = False  # entries come from a verified index.json (so file hashes are checked)
    signed_by: str | None = None

    @property
    def label(self) -> str:
        return "shipped" if self.kind == "shipped" else self.location

    def find(self, name: str, version: str | None) -> Entry | None:
        """The entry called `name` (at `version`, or the newest)."""
        matches = [e for e in self.entries if e.name == name and (version is None or e.version == version)]
        return max(matches, key=lambda e: version_key(e.version)) if matches else None

    def at_path(self, rel: PurePosixPath) -> Entry | None:
        return next((e for e in self.entries if PurePosixPath(e.path) == rel), None)

    def materialize(self, entry: Entry) -> Path:
        """A local, verified copy of the entry's recipe file (and the files it needs)."""
        if self.kind == "remote":
            return _cached_copy(self, entry)
        assert self.root is not None
        path = inside_library(self.root, entry.path, f"{self.label}: recipe path")
        if self.indexed:
            for rel, expected in entry.files.items():
                local = inside_library(self.root, rel, f"{self.label}: file")
                _check_file(local, expected, f"{self.label}: {entry.name}@{entry.version}")
        if not path.is_file():
            raise LibraryError(f"{self.label}: {entry.path} is listed but missing")
        return path


def version_key(version: str) -> tuple[Any, ...]:
    """Order versions numerically where they are numbers (`1.10` > `1.9`), else as text."""
    from packaging.version import InvalidVersion, Version

    try:
        return (1, Version(version), "")
    except InvalidVersion:
        return (0, Version("0"), version)


def _check_file(path: Path, expected: str, what: str) -> None:
    if not path.is_file() or path.is_symlink():
        raise LibraryError(f"{what}: {path} is missing (or not a plain file)")
    actual = sha256_file(path)
    if actual != expected:
        raise LibraryError(
            f"{what}: {path.name} has sha256 {actual[:12]}…, the index says {expected[:12]}…; refusing it"
        )


def _cached_copy(library: Library, entry: Entry) -> Path:
    """Fetch a remote entry's files into cache/library/<sha256>/, verified before they are kept."""
    target = cache_dir() / "library" / entry.sha256
    recipe = target.joinpath(*safe_relative(entry.path, f"{library.label}: recipe path").parts)
    if target.is_dir():
        try:
            for rel, expected in entry.files.items():
                _check_file(target.joinpath(*PurePosixPath(rel).parts), expected, f"cached {entry.name}")
            return recipe
        except LibraryError:
            shutil.rmtree(target, ignore_errors=True)  # damaged cache: fetch again
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.sha256[:12]}-", dir=target.parent))
    try:
        for rel, expected in entry.files.items():
            parts = safe_relative(rel, f"{library.label}: file").parts
            limit = MAX_RECIPE_BYTES if rel == entry.path else MAX_FILE_BYTES
            data = fetch(library.location + "/".join(urllib.parse.quote(p) for p in parts), limit)
            if sha256_bytes(data) != expected:
                raise LibraryError(
                    f"{library.location}{rel}: sha256 {sha256_bytes(data)[:12]}… does not match the index "
                    f"({expected[:12]}…); refusing it"
                )
            out = tmp.joinpath(*parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
        try:
            os.replace(tmp, target)
        except OSError:  # another process cached it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return recipe


# --------------------------------------------------------------------------- reading libraries


def scan_folder(root: Path, kind: str, location: str) -> Library:
    """A folder's recipe files as a library, each described by the fields it writes itself."""
    entries = []
    real_root = root.resolve()
    for path in sorted(root.rglob("*.yaml")):
        if path.is_symlink() or not path.is_file() or not path.resolve().is_relative_to(real_root):
            continue
        rel = path.relative_to(root).as_posix()
        try:
            own = read_fields(path)
        except SurgeryError:
            own = {}
        digest = sha256_file(path)
        entries.append(
            Entry(
                name=str(own.get("name") or path.stem),
                version=str(own.get("version") or (__version__ if kind == "shipped" else DEFAULT_VERSION)),
                path=rel,
                sha256=digest,
                files={rel: digest},
                description=str(own.get("description") or ""),
                tags=tuple(str(t) for t in own.get("tags") or () if isinstance(t, str)),
            )
        )
    return Library(location=location, kind=kind, entries=entries, root=root)


@functools.cache
def shipped_library() -> Library:
    """The recipes that come with surgery (read once per process: they are package data)."""
    return scan_folder(SHIPPED_DIR, "shipped", "shipped") if SHIPPED_DIR.is_dir() else Library("shipped", "shipped", [])


@dataclass(frozen=True)
class Index:
    """A verified index.json: its entries, who signed it, and when it was published and stops
    being valid (both None in an index written before indexes carried them)."""

    entries: list[Entry]
    signer: str | None
    published: datetime | None
    expires: datetime | None


def parse_index(data: bytes, where: str, *, allow_unsigned: bool, remote: bool) -> Index:
    """An index.json, its signature checked (`surgery.keys`): a signature that fails, or one by a
    key not in the trust list, is refused; so is an unsigned remote index unless `allow_unsigned`.
    Its dates are read here and judged by whoever fetched it (`surgery.library_remote`)."""
    doc, signer = read_signed_document(
        data,
        where,
        doc_format=INDEX_FORMAT,
        doc_version=INDEX_FORMAT_VERSION,
        kind="index",
        remote=remote,
        allow_unsigned=allow_unsigned,
        unsigned="the index is not signed; refusing a remote library without a signature "
        "(add the source with --allow-unsigned if you trust it anyway)",
        error=LibraryError,
    )
    entries = [_entry(item, where) for item in _list(doc.get("recipes"), where)]
    published, expires = (_date(doc.get(key), key, where) for key in ("published", "expires"))
    if published and expires and expires <= published:
        raise LibraryError(f"{where}: expires ({format_date(expires)}) before it was published; refusing it")
    return Index(entries, signer, published, expires)


def format_date(when: datetime) -> str:
    """How an index writes a date: UTC, to the second (`2025-01-31T12:00:00Z`)."""
    return when.astimezone(UTC).strftime(DATE_FORMAT)


def _date(value: Any, key: str, where: str) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.strptime(value, DATE_FORMAT).replace(tzinfo=UTC)
    except (TypeError, ValueError):
        raise LibraryError(f"{where}: `{key}` is not a date like 2025-01-31T12:00:00Z; refusing the index") from None


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise LibraryError(f"{where}: `recipes` must be a list")
    return value


def _entry(item: Any, where: str) -> Entry:
    if not isinstance(item, dict):
        raise LibraryError(f"{where}: every recipe entry must be an object")
    name, version, path, digest = (item.get(k) for k in ("name", "version", "path", "sha256"))
    label = f"{where}: entry {name!r}"
    if not isinstance(name, str) or not re.fullmatch(NAME, name):
        raise LibraryError(f"{label}: bad name")
    if not isinstance(version, str) or not re.fullmatch(VERSION, version):
        raise LibraryError(f"{label}: bad version {version!r}")
    if not isinstance(path, str) or not isinstance(digest, str) or not _SHA256.match(digest):
        raise LibraryError(f"{label}: needs a path and a sha256")
    safe_relative(path, label)
    files = item.get("files") or {path: digest}
    if not isinstance(files, dict) or files.get(path) != digest:
        raise LibraryError(f"{label}: `files` must map paths to sha256 and include the recipe itself")
    for rel, sha in files.items():
        safe_relative(rel, label)
        if not isinstance(sha, str) or not _SHA256.match(sha):
            raise LibraryError(f"{label}: file {rel!r} has no valid sha256")
    tags = item.get("tags") or []
    return Entry(
        name=name,
        version=version,
        path=path,
        sha256=digest,
        files=dict(files),
        description=str(item.get("description") or ""),
        tags=tuple(str(t) for t in tags) if isinstance(tags, list) else (),
    )


def folder_library(root: Path) -> Library:
    """A local folder: read through its index.json when it has one, else scanned."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise LibraryError(f"{root}: library folder does not exist")
    index = root / INDEX
    if not index.is_file():
        return scan_folder(root, "folder", str(root))
    parsed = parse_index(read_limited(index, MAX_INDEX_BYTES), str(index), allow_unsigned=True, remote=False)
    return Library(str(root), "folder", parsed.entries, root=root, indexed=True, signed_by=parsed.signer)


def read_limited(path: Path, limit: int) -> bytes:
    with path.open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise LibraryError(f"{path}: larger than the {limit // 2**20} MiB limit")
    return data


__all__ = [
    "DATE_FORMAT",
    "INDEX",
    "INDEX_EXPIRES_DAYS",
    "INDEX_FORMAT",
    "INDEX_FORMAT_VERSION",
    "NAME",
    "VERSION",
    "Entry",
    "Index",
    "Library",
    "folder_library",
    "format_date",
    "inside_library",
    "parse_index",
    "read_limited",
    "safe_relative",
    "scan_folder",
    "shipped_library",
    "version_key",
]
