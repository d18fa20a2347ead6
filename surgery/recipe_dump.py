"""A loaded recipe written back out: its canonical plain data and YAML, the hash that identifies
it (for locks, resumes and bundles), and what differs between two recipes. No torch.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import yaml

from surgery.recipe_yaml import PATH_FIELDS, FieldPath, dotted
from surgery.schema import Recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The canonical plain-data form of a recipe (fields left unset, i.e. None, are omitted)."""
    return recipe.model_dump(mode="python", exclude_none=True)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML; `load_recipe_text(dump_recipe(r)) == r`."""
    return yaml.safe_dump(
        recipe_to_dict(recipe), sort_keys=False, allow_unicode=True, default_flow_style=False, width=100
    )


def recipe_hash(recipe: Recipe, *, portable: bool = False) -> str:
    """sha256 (hex) of the canonical dump: equal recipes hash equal. `portable`: paths are hashed
    relative to the recipe file's folder, so a moved checkout hashes the same (the resume contract)."""
    if not portable or recipe._source_dir is None:
        return hashlib.sha256(dump_recipe(recipe).encode("utf-8")).hexdigest()
    data = recipe_to_dict(recipe)
    for section, key in PATH_FIELDS:
        part = data.get(section)
        if isinstance(part, dict) and part.get(key):
            part[key] = os.path.relpath(part[key], recipe._source_dir)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _flatten(value: Any, prefix: tuple[str | int, ...], out: dict[FieldPath, Any]) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(item, (*prefix, key), out)
    elif isinstance(value, list) and value:
        for i, item in enumerate(value):
            _flatten(item, (*prefix, i), out)
    else:
        out[prefix] = value


def _moved(before: dict[FieldPath, Any], after: dict[FieldPath, Any], new_dir: str | None) -> bool:
    """Whether every path that differs is the same path relative to one old recipe folder as it is
    relative to the new recipe's folder: the checkout moved, the paths did not change."""
    pairs = [(before.get(p), after.get(p)) for p in PATH_FIELDS if before.get(p) != after.get(p)]
    if new_dir is None or not pairs or not all(isinstance(a, str) and isinstance(b, str) for a, b in pairs):
        return False
    old_dirs = {os.path.normpath(os.path.join(a, os.path.relpath(new_dir, b))) for a, b in pairs}
    if len(old_dirs) != 1:
        return False
    (old_dir,) = old_dirs
    return all(os.path.relpath(a, old_dir) == os.path.relpath(b, new_dir) for a, b in pairs)


def recipe_diff(old: Recipe, new: Recipe) -> list[tuple[str, Any, Any]]:
    """Every leaf that differs, as (dotted path, old value, new value); absent is None."""
    before: dict[FieldPath, Any] = {}
    after: dict[FieldPath, Any] = {}
    _flatten(recipe_to_dict(old), (), before)
    _flatten(recipe_to_dict(new), (), after)
    if _moved(before, after, new._source_dir):
        for path in PATH_FIELDS:
            if path in before:
                before[path] = after[path]
    paths = list(dict.fromkeys([*before, *after]))
    return [
        (dotted(p), before.get(p), after.get(p))
        for p in paths
        if before.get(p) != after.get(p) or (p in before) != (p in after)
    ]


__all__ = ["dump_recipe", "recipe_diff", "recipe_hash", "recipe_to_dict"]
