"""The recipe library: what a recipe reference points at, and fetching it safely.

A *reference* is how a user names a recipe, on the command line or in `extends:`:

- a path (`my.yaml`, `../base.yaml`), relative to the file that names it (or the current folder);
- a name (`quickstart`): the shipped library first, then the configured sources in the order they
  were added; the newest version wins;
- `name@version`: exactly that version, from the first library that has it.

A *library* is a folder of recipe files: the shipped one (inside the package), a local folder, or
a remote folder that is only static files on a web server (`https://host/lib/`). A folder with an
`index.json` (written by `surgery recipes index`) is read through it: each entry lists the recipe's
name, version, sha256 and the files it needs, and the whole index may carry an Ed25519 signature
(`surgery.keys`). A local folder without an index is scanned for `*.yaml`.

Fetched recipes are cached by content hash under the cache folder and every file is checked
against the index before anything reads it. A recipe from a library may only extend recipes of
that same library (by name, or by a relative path without `..`).

Nothing here imports torch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from surgery import __version__
from surgery.errors import SurgeryError
from surgery.files import sha256_file

PACKAGE_DIR = Path(__file__).resolve().parent
SHIPPED_DIR = (PACKAGE_DIR / "shipped").resolve()  # in a checkout, a symlink to the repository's recipes/
SCHEMA_FILE = PACKAGE_DIR / "recipe.schema.json"
INDEX = "index.json"
INDEX_FORMAT = "surgery-library"
INDEX_FORMAT_VERSION = 1
MAX_INDEX_BYTES = 4 << 20
MAX_RECIPE_BYTES = 1 << 20
MAX_FILE_BYTES = 64 << 20  # a data file shipped with a recipe (the library holds no weights)
FETCH_TIMEOUT_S = 20.0
DEFAULT_VERSION = "0"

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_VERSION = r"[A-Za-z0-9][A-Za-z0-9._+-]*"
REFERENCE = re.compile(rf"^(?P<name>{_NAME})(?:@(?P<version>{_VERSION}))?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class LibraryError(SurgeryError):
    """A reference that resolves to nothing, or a library or file that fails verification."""


# --------------------------------------------------------------------------- places


def config_dir() -> Path:
    """Where sources and keys are kept: $SURGERY_CONFIG_DIR, else $XDG_CONFIG_HOME/surgery."""
    if os.environ.get("SURGERY_CONFIG_DIR"):
        return Path(os.environ["SURGERY_CONFIG_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CONFIG_HOME") or "~/.config").expanduser() / "surgery"


def cache_dir() -> Path:
    """Where fetched recipes and indexes are cached: $SURGERY_CACHE_DIR, else $XDG_CACHE_HOME/surgery."""
    if os.environ.get("SURGERY_CACHE_DIR"):
        return Path(os.environ["SURGERY_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "surgery"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
        path = self.root.joinpath(*safe_relative(entry.path, f"{self.label}: recipe path").parts)
        if self.indexed:
            for rel, expected in entry.files.items():
                local = self.root.joinpath(*safe_relative(rel, f"{self.label}: file").parts)
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


def _own_fields(path: Path) -> dict[str, Any]:
    """The top-level keys a recipe file writes itself (not through `extends`)."""
    from surgery.recipe import read_fields

    return read_fields(path)


def _scan(root: Path, kind: str, location: str) -> Library:
    entries = []
    for path in sorted(root.rglob("*.yaml")):
        if path.is_symlink() or not path.is_file():
            continue
        rel = path.relative_to(root).as_posix()
        try:
            own = _own_fields(path)
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
    return _scan(SHIPPED_DIR, "shipped", "shipped") if SHIPPED_DIR.is_dir() else Library("shipped", "shipped", [])


def parse_index(data: bytes, where: str, *, allow_unsigned: bool, remote: bool) -> tuple[list[Entry], str | None]:
    """Entries of an index.json, its signature checked (`surgery.keys`): a signature that fails,
    or one by a key not in the trust list, is refused; so is an unsigned remote index unless
    `allow_unsigned`."""
    from surgery.keys import verify_document

    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LibraryError(f"{where}: not a JSON index ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
        raise LibraryError(f"{where}: not a surgery library index (format is not {INDEX_FORMAT!r})")
    if doc.get("format_version") != INDEX_FORMAT_VERSION:
        raise LibraryError(
            f"{where}: unknown index format_version {doc.get('format_version')!r} "
            f"(this surgery reads {INDEX_FORMAT_VERSION}); upgrade surgery"
        )
    signer = verify_document(doc, where)
    if signer is None and remote and not allow_unsigned:
        raise LibraryError(
            f"{where}: the index is not signed; refusing a remote library without a signature "
            "(add the source with --allow-unsigned if you trust it anyway)"
        )
    return [_entry(item, where) for item in _list(doc.get("recipes"), where)], signer


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise LibraryError(f"{where}: `recipes` must be a list")
    return value


def _entry(item: Any, where: str) -> Entry:
    if not isinstance(item, dict):
        raise LibraryError(f"{where}: every recipe entry must be an object")
    name, version, path, digest = (item.get(k) for k in ("name", "version", "path", "sha256"))
    label = f"{where}: entry {name!r}"
    if not isinstance(name, str) or not re.fullmatch(_NAME, name):
        raise LibraryError(f"{label}: bad name")
    if not isinstance(version, str) or not re.fullmatch(_VERSION, version):
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
        return _scan(root, "folder", str(root))
    entries, signer = parse_index(_read_limited(index, MAX_INDEX_BYTES), str(index), allow_unsigned=True, remote=False)
    return Library(str(root), "folder", entries, root=root, indexed=True, signed_by=signer)


def _read_limited(path: Path, limit: int) -> bytes:
    with path.open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise LibraryError(f"{path}: larger than the {limit // 2**20} MiB limit")
    return data


def remote_library(url: str, *, allow_unsigned: bool = False) -> Library:
    """A library served as static files. Its index is cached so a fetched recipe stays usable offline."""
    base = url if url.endswith("/") else url + "/"
    if base.endswith(INDEX + "/"):
        base = base[: -len(INDEX) - 1]
    cached = cache_dir() / "indexes" / (sha256_bytes(base.encode()) + ".json")
    try:
        data = fetch(base + INDEX, MAX_INDEX_BYTES)
    except LibraryError as err:
        if not cached.is_file():
            raise
        print(f"note: {err}; using the index cached on a previous fetch", file=sys.stderr)
        data = cached.read_bytes()
    entries, signer = parse_index(data, base + INDEX, allow_unsigned=allow_unsigned, remote=True)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(cached.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, cached)
    return Library(base, "remote", entries, indexed=True, signed_by=signer)


# --------------------------------------------------------------------------- configured sources


def _sources_file() -> Path:
    return config_dir() / "sources.json"


def configured_sources() -> list[dict[str, Any]]:
    """The sources added with `surgery recipes add-source`, in order."""
    path = _sources_file()
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
    _write_json(_sources_file(), {"sources": sources})
    return library


def remove_source(location: str) -> None:
    """`surgery recipes remove-source`."""
    sources = configured_sources()
    wanted = location if is_url(location) else str(Path(location).expanduser().resolve())
    kept = [s for s in sources if s["location"] not in (location, wanted)]
    if len(kept) == len(sources):
        raise LibraryError(f"{location}: not a configured source (`surgery recipes sources` lists them)")
    _write_json(_sources_file(), {"sources": kept})


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def libraries() -> Iterable[Library]:
    """The shipped library, then each configured source, opened lazily in order."""
    yield shipped_library()
    for source in configured_sources():
        yield open_source(source)


# --------------------------------------------------------------------------- resolving references


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

    def line(self) -> str:
        """One provenance line, as `recipe.lock.yaml` records it."""
        what = f"{self.name}@{self.version}" if self.name else self.reference
        where = f"{self.source} {self.entry_path}" if self.library is not None else f"file {self.path}"
        return f"{what} ({where}) sha256:{self.sha256}"


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.sep in text or REFERENCE.match(text.removesuffix(".yaml")) is None


def _from_library(library: Library, entry: Entry, reference: str) -> Resolved:
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
    for library in libraries():
        entry = library.find(name, version)
        if entry is not None:
            return _from_library(library, entry, reference)
        searched.append(library.label)
    wanted = f"{name}@{version}" if version else name
    no_file = f"no such recipe file {reference!r}, and " if reference.endswith(".yaml") else ""
    raise LibraryError(f"{no_file}no recipe {wanted!r} in the libraries (searched: {', '.join(searched)}){_hint(name)}")


def _hint(name: str) -> str:
    from surgery.registry import did_you_mean

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
        return _from_library(library, entry, reference)
    match = REFERENCE.match(reference.removesuffix(".yaml"))
    assert match is not None
    entry = library.find(match["name"], match["version"]) or library.at_path(
        PurePosixPath(within.entry_path).parent / reference
    )
    if entry is None:
        raise LibraryError(
            f"{reference!r}: no such recipe in library {library.label} (its recipes may only extend its own)"
        )
    return _from_library(library, entry, reference)


# --------------------------------------------------------------------------- commands


def build_index(folder: Path, *, sign: str | None = None) -> Path:
    """`surgery recipes index FOLDER`: validate every recipe in FOLDER (their `extends` resolved
    inside FOLDER only) and write FOLDER/index.json, signed with `sign` if given. Publishing the
    folder as static files makes it a remote library."""
    from surgery.recipe import load_resolved

    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise LibraryError(f"{root}: no such folder")
    scanned = _scan(root, "folder", str(root))
    entries: list[Entry] = []
    problems: list[str] = []
    for entry in scanned.entries:
        try:
            recipe = load_resolved(_from_library(scanned, entry, entry.name))
        except SurgeryError as err:
            problems.append(str(err))
            continue
        files = {entry.path: entry.sha256, **_files_under(root, _local_paths(recipe))}
        entries.append(
            Entry(
                entry.name, entry.version, entry.path, entry.sha256, files, recipe.description, tuple(recipe.tags or ())
            )
        )
    seen: dict[tuple[str, str], str] = {}
    for e in entries:
        if (e.name, e.version) in seen:
            problems.append(
                f"{e.path}: {e.name}@{e.version} is also {seen[(e.name, e.version)]}; give it a new `version:`"
            )
        seen[(e.name, e.version)] = e.path
    if problems:
        raise LibraryError("\n".join(problems))
    doc: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "format_version": INDEX_FORMAT_VERSION,
        "recipes": [
            {
                "name": e.name,
                "version": e.version,
                "path": e.path,
                "sha256": e.sha256,
                "files": e.files,
                "description": e.description,
                "tags": list(e.tags),
            }
            for e in entries
        ],
    }
    if sign:
        from surgery.keys import sign_document

        doc = sign_document(doc, sign)
    _write_json(root / INDEX, doc)
    return root / INDEX


def _local_paths(recipe: Any) -> list[Path]:
    data = recipe.data
    paths = [recipe.backbone.weights, data.train if data else None, data.val if data else None]
    return [Path(p) for p in paths if p]


def _files_under(root: Path, paths: list[Path]) -> dict[str, str]:
    """sha256 of the files (or the files in the folders) `paths` name inside `root`."""
    files: dict[str, str] = {}
    for path in paths:
        if not path.resolve().is_relative_to(root):
            continue
        found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
        for file in found:
            if not file.is_symlink():
                files[file.resolve().relative_to(root).as_posix()] = sha256_file(file)
    return files


def list_recipes(tag: str | None = None) -> str:
    """`surgery recipes list`: every recipe of every library, as a table."""
    rows = [("NAME", "VERSION", "LIBRARY", "TAGS", "DESCRIPTION")]
    notes = []
    for library in _each_library(notes):
        for e in sorted(library.entries, key=lambda e: (e.name, version_key(e.version))):
            if tag is None or tag in e.tags:
                rows.append((e.name, e.version, library.label, ",".join(e.tags), e.description))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4] for r in rows]
    return "\n".join(line.rstrip() for line in [*lines, *notes])


def _each_library(notes: list[str]) -> Iterable[Library]:
    yield shipped_library()
    for source in configured_sources():
        try:
            yield open_source(source)
        except SurgeryError as err:  # one unreachable source does not hide the others
            notes.append(f"note: {source['location']}: {err}")


def show_recipe(reference: str) -> str:
    """`surgery recipes show REF`: the recipe file as written, under a line saying where it is from."""
    found = resolve(reference, Path.cwd())
    text = found.path.read_text(encoding="utf-8")
    return f"# {found.line()}\n# file: {found.path}\n{text}"


STARTER = """\
# yaml-language-server: $schema={schema}
#
# Starts from {base}{about}. Everything is inherited; write only what changes:
# mappings merge key by key, lists (heads, freeze, augment, ...) replace the base's whole list.
# `surgery show {file}` prints the resolved recipe, `surgery plan {file}` the model.
extends: {base}
name: {name}
description: ""
# version: "0.1.0"                    # when you publish it in a library (`surgery recipes index`)
# tags: []
# data: {{train: path/to/train, val: path/to/val}}
# train: {{epochs: 5, optimizer: {{lr: 1.0e-4}}}}
"""


def new_recipe(name: str, base: str, folder: Path | None = None) -> Path:
    """`surgery recipes new NAME --from BASE`: NAME.yaml, a starter that extends BASE."""
    from surgery.recipe import load_recipe

    if not re.fullmatch(_NAME, name):
        raise LibraryError(f"{name!r}: a recipe name is letters, digits, '.', '_' or '-'")
    folder = Path(folder or Path.cwd()).resolve()
    path = folder / f"{name}.yaml"
    if path.exists():
        raise LibraryError(f"{path} exists already; not overwriting it")
    found = resolve(base, Path.cwd())
    extends = base if found.library is not None else os.path.relpath(found.path, folder)
    about = ""
    if found.library is not None:
        entry = found.library.find(found.name or "", found.version)
        about = f" ({entry.description})" if entry and entry.description else ""
    folder.mkdir(parents=True, exist_ok=True)
    text = STARTER.format(schema=SCHEMA_FILE, base=extends, about=about, name=name, file=path.name)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        load_recipe(tmp)
    except SurgeryError:
        tmp.unlink()
        raise
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- provenance


def _zoo_weight_lines(backbone: Any) -> list[str]:
    """The hash of the zoo's cached weights file a pretrained backbone was loaded from (after
    the build, so the file is in the cache)."""
    if not backbone.pretrained or backbone.weights or backbone.name.startswith("package:"):
        return []
    try:
        file = _zoo_cache_file(backbone)
    except Exception:  # provenance must never fail a run; say what is unknown instead
        file = None
    what = f"{backbone.source} {backbone.name}"
    if file is None or not file.is_file():
        return [f"# weights: {what} from the zoo's hub/cache (cached file not found, so not hashed)"]
    return [f"# weights: {what} {file} sha256:{sha256_file(file)}"]


def _zoo_cache_file(backbone: Any) -> Path | None:
    if backbone.source == "torchvision":
        import torch
        import torchvision

        weights = torchvision.models.get_model_weights(backbone.name).DEFAULT
        return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    from huggingface_hub import try_to_load_from_cache

    if backbone.source == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(backbone.name)
        if cfg is None or not cfg.hf_hub_id:
            return None
        repo, revision = cfg.hf_hub_id, None
    elif Path(backbone.name).expanduser().is_dir():
        folder = Path(backbone.name).expanduser()
        return next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()), None)
    else:
        repo, revision = backbone.name, backbone.revision
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename, revision=revision)
        if isinstance(found, str):
            return Path(found)
    return None


class Provenance(list):  # type: ignore[type-arg]
    """Where each file of a recipe's `extends` chain came from (the recipe first). Rides on the
    loaded `Recipe` as a private attribute; it is not part of what the recipe *is*, so two recipes
    with the same fields compare equal whatever their provenance."""

    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = None  # type: ignore[assignment]


def provenance_lines(recipe: Any) -> list[str]:
    """`recipe.lock.yaml` header lines: every recipe of the `extends` chain (source, version,
    sha256) and the hashes of weights that ship inside a package."""
    chain = getattr(recipe, "_provenance", None) or []
    lines = [f"# {'recipe' if i == 0 else 'extends'}: {item.line()}" for i, item in enumerate(chain)]
    return lines + _package_weight_lines(recipe) + _zoo_weight_lines(recipe.backbone)


def _package_weight_lines(recipe: Any) -> list[str]:
    backbone = recipe.backbone
    if not (backbone.pretrained and backbone.source == "transformers" and backbone.name.startswith("package:")):
        return []
    from importlib import metadata

    distribution = backbone.name[len("package:") :]
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return []
    weights = [f for f in dist.files or [] if f.suffix in (".safetensors", ".bin")]
    return [
        f"# weights: package {distribution} {dist.version} {f.as_posix()} sha256:{sha256_file(Path(str(dist.locate_file(f))))}"
        for f in sorted(weights, key=str)
    ]


__all__ = [
    "Entry",
    "Library",
    "LibraryError",
    "Provenance",
    "Resolved",
    "add_source",
    "build_index",
    "cache_dir",
    "config_dir",
    "configured_sources",
    "folder_library",
    "libraries",
    "list_recipes",
    "new_recipe",
    "provenance_lines",
    "remote_library",
    "remove_source",
    "resolve",
    "shipped_library",
    "show_recipe",
]
