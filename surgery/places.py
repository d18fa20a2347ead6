"""Where surgery keeps things on disk: the package's own data (shipped recipes, the recipe JSON
Schema) and the user's config and cache folders. Kept apart so that everything that needs a
place (the library, keys, sources) can ask for it without importing each other. No torch."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
SHIPPED_DIR = (PACKAGE_DIR / "shipped").resolve()  # in a checkout, a symlink to the repository's recipes/
SCHEMA_FILE = PACKAGE_DIR / "recipe.schema.json"


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


def sources_file() -> Path:
    """The libraries added with `surgery recipes add-source`, in order."""
    return config_dir() / "sources.json"


def seen_indexes_file() -> Path:
    """The newest index verified from each remote library: what an older one is refused against.
    Kept with the configuration, not the cache, so that clearing the cache does not forget it."""
    return config_dir() / "seen_indexes.json"


def package_model_folder(dist: Any) -> Path | None:
    """The model folder an installed distribution (`importlib.metadata`) ships for a `package:`
    backbone: the one holding its shallowest `config.json`, found from its file list (its code is
    never imported); None when it lists none. The build loads from it and the lock hashes it."""
    configs = sorted((f for f in dist.files or [] if f.name == "config.json"), key=lambda f: len(f.parts))
    return Path(str(dist.locate_file(configs[0]))).parent.resolve() if configs else None


__all__ = [
    "PACKAGE_DIR",
    "SCHEMA_FILE",
    "SHIPPED_DIR",
    "cache_dir",
    "config_dir",
    "package_model_folder",
    "seen_indexes_file",
    "sources_file",
]
