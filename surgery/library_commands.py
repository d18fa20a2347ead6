"""The `surgery recipes` commands that load whole recipes: publishing a folder as a library
(`index`), listing every library's recipes (`list`), showing one (`show`) and starting a new
recipe from another (`new`). They sit above both the loader and the libraries, so that resolving
a reference never loads a recipe. No torch.
"""

from __future__ import annotations

import os
import re
import unicodedata
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError
from surgery.files import sha256_file, write_json_atomic
from surgery.keys import sign_document
from surgery.library_fetch import LibraryError
from surgery.library_index import (
    INDEX,
    INDEX_EXPIRES_DAYS,
    INDEX_FORMAT,
    INDEX_FORMAT_VERSION,
    NAME,
    Entry,
    format_date,
    scan_folder,
    version_key,
)
from surgery.library_resolve import from_library, resolve
from surgery.library_sources import libraries
from surgery.places import SCHEMA_FILE
from surgery.recipe import load_recipe, load_resolved


def build_index(folder: Path, *, sign: str | None = None, expires_days: float | None = None) -> Path:
    """`surgery recipes index FOLDER`: validate every recipe in FOLDER (their `extends` resolved
    inside FOLDER only) and write FOLDER/index.json, signed with `sign` if given, published now and
    valid for `expires_days` (clients refuse it after that, and refuse one published before the
    newest they have seen). Publishing the folder as static files makes it a remote library."""
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise LibraryError(f"{root}: no such folder")
    expires_days = INDEX_EXPIRES_DAYS if expires_days is None else expires_days
    if not 0 < expires_days <= 3650:
        raise LibraryError(f"--expires-days {expires_days:g}: give a number of days between 1 and 3650")
    now = datetime.now(UTC)
    scanned = scan_folder(root, "folder", str(root))
    entries: list[Entry] = []
    problems: list[str] = []
    for entry in scanned.entries:
        try:
            recipe = load_resolved(from_library(scanned, entry, entry.name))
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
        "published": format_date(now),
        "expires": format_date(now + timedelta(days=expires_days)),
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
        doc = sign_document(doc, sign)
    write_json_atomic(root / INDEX, doc)
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
    notes: list[str] = []
    for library in libraries(notes):
        for e in sorted(library.entries, key=lambda e: (e.name, version_key(e.version))):
            if tag is None or tag in e.tags:
                row = (e.name, e.version, library.label, ",".join(e.tags), e.description)
                rows.append(tuple(printable(c) for c in row))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4] for r in rows]
    return "\n".join(line.rstrip() for line in [*lines, *(printable(n) for n in notes)])


def printable(text: str, keep: str = "") -> str:
    """`text` safe to print on a terminal: control and format characters (escape sequences, bidi
    overrides, newlines unless kept) shown as `\\x1b`-style escapes instead of acting."""
    return "".join(
        c if c in keep or unicodedata.category(c) not in ("Cc", "Cf", "Cs") else ascii(c)[1:-1] for c in text
    )


def show_recipe(reference: str) -> str:
    """`surgery recipes show REF`: the recipe file as written (control characters escaped), under
    a line saying where it is from."""
    found = resolve(reference, Path.cwd())
    text = printable(found.path.read_text(encoding="utf-8", errors="replace"), keep="\n\t")
    return f"# {printable(found.line())}\n# file: {printable(str(found.path))}\n{text}"


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
    if not re.fullmatch(NAME, name):
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


__all__ = ["STARTER", "build_index", "list_recipes", "new_recipe", "printable", "show_recipe"]
