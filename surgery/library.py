"""The recipe library: what a recipe reference points at, and fetching it safely.

A *reference* is how a user names a recipe, on the command line or in `extends:`: a path, a name
(`quickstart`, the shipped library first, then the configured sources) or `name@version`. A
*library* is a folder of recipe files: the shipped one (inside the package), a local folder, or a
remote folder that is only static files on a web server, read through a (signed) `index.json`.

This module is the library's public face; its parts are imported one way, each below the next:

- `surgery.places`: the config and cache folders, the shipped recipes;
- `surgery.library_fetch`: http(s) GETs with limits (bytes, deadline, speed), `LibraryError`;
- `surgery.library_index`: entries and libraries (shipped, folder, remote), indexes, the cache;
- `surgery.library_remote`: remote indexes fetched and judged fresh (expiry, rollback, offline);
- `surgery.library_sources`: configured sources, and the order libraries are searched in;
- `surgery.library_resolve`: references → files (never loads a recipe);
- `surgery.library_commands`: `surgery recipes index/list/show/new`, which load recipes;
- `surgery.provenance`: where a recipe and its weights came from, for the lock file.

`from surgery.library import ...` keeps working for every name below; code inside `surgery/`
imports from the part that defines a name. Nothing here imports torch.
"""

from __future__ import annotations

from surgery.library_commands import build_index, list_recipes, new_recipe, show_recipe
from surgery.library_fetch import FetchError, LibraryError, fetch, fetch_to_file, is_url, sha256_bytes
from surgery.library_index import (
    INDEX,
    Entry,
    Index,
    Library,
    folder_library,
    parse_index,
    safe_relative,
    shipped_library,
    version_key,
)
from surgery.library_remote import remote_library
from surgery.library_resolve import REFERENCE, Resolved, resolve
from surgery.library_sources import add_source, configured_sources, libraries, open_source, remove_source
from surgery.places import SCHEMA_FILE, SHIPPED_DIR, cache_dir, config_dir
from surgery.provenance import Provenance, provenance_lines

__all__ = [
    "INDEX",
    "REFERENCE",
    "SCHEMA_FILE",
    "SHIPPED_DIR",
    "Entry",
    "FetchError",
    "Index",
    "Library",
    "LibraryError",
    "Provenance",
    "Resolved",
    "add_source",
    "build_index",
    "cache_dir",
    "config_dir",
    "configured_sources",
    "fetch",
    "fetch_to_file",
    "folder_library",
    "is_url",
    "libraries",
    "list_recipes",
    "new_recipe",
    "open_source",
    "parse_index",
    "provenance_lines",
    "remote_library",
    "remove_source",
    "resolve",
    "safe_relative",
    "sha256_bytes",
    "shipped_library",
    "show_recipe",
    "version_key",
]
