"""Reading recipes: a reference or YAML text → a checked `Recipe`, every problem pointing at its
line. This is the recipe language's public face; its parts are imported one way, each below the
next:

- `surgery.recipe_yaml`: YAML → plain data with positions (safe grammar, plain tags only, size,
  depth and alias-bomb limits), recipe files read with limits, paths made absolute;
- `surgery.recipe_compose`: `extends:` (bases found by `surgery.library_resolve`) and `--set`;
- `surgery.recipe_validate`: the schema's checks, each problem as ``file:line:col path: message``;
- `surgery.recipe_dump`: canonical dump, hash and diff of a loaded recipe.

`from surgery.recipe import load_recipe, dump_recipe, ...` keeps working for every name here;
code inside `surgery/` that needs only a part imports that part. Nothing here imports torch:
`surgery validate` stays instant.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from surgery.library_fetch import LibraryError
from surgery.library_resolve import Resolved, resolve
from surgery.places import SHIPPED_DIR
from surgery.provenance import Provenance
from surgery.recipe_compose import apply_overrides, load_document, override_path
from surgery.recipe_dump import dump_recipe, recipe_diff, recipe_hash, recipe_to_dict
from surgery.recipe_validate import validated
from surgery.recipe_yaml import MAX_BYTES, Location, Pos, display_path, locate, problem, read_fields, read_recipe_file
from surgery.schema import Recipe

RECIPES_DIR: Path = SHIPPED_DIR
"""The shipped recipe library (`surgery/shipped`, the repository's `recipes/`)."""


def load_recipe_text(
    text: str,
    *,
    filename: str = "<string>",
    base_dir: Path | None = None,
    overrides: Sequence[str] = (),
) -> Recipe:
    """Parse, extend, override and validate recipe text. Raises RecipeError listing every problem
    as ``file:line:col path: message``. Relative paths resolve against `base_dir` (default: cwd)."""
    base = Path(base_dir).resolve() if base_dir is not None else Path.cwd()
    trail: list[Resolved] = []
    data, pos = load_document(text, filename, base, (), None, trail)
    apply_overrides(data, pos, overrides)
    recipe = validated(data, pos)
    recipe._provenance = Provenance(trail)
    return recipe


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load a recipe by reference — a file, a shipped or library name, or `name@version` — with
    `--set` overrides."""
    return _load_reference(path, overrides, validate=True)


def field_location(path: str | Path, overrides: Sequence[str], field: Sequence[str | int]) -> Location:
    """Where a field of a recipe (a reference as for `load_recipe`, extends and `--set` applied)
    was written, for problems found after loading it (`surgery tune` checking its space's values)."""
    _data, pos = _load_reference(path, overrides, validate=False)
    return locate(pos, tuple(field))


def unvalidated_data(path: str | Path, overrides: Sequence[str]) -> dict[str, Any]:
    """A recipe's data, extends and `--set` applied but not validated: what a check that goes on
    after the schema refused part of a recipe reads (`surgery tune` checking the rest of its space)."""
    data, _pos = _load_reference(path, overrides, validate=False)
    return data


def _load_reference(path: str | Path, overrides: Sequence[str], *, validate: bool) -> Any:
    given = str(path)
    try:
        found = resolve(given, Path.cwd())
    except LibraryError as err:
        raise problem(given, str(err).removeprefix(f"{given} ")) from None
    display = given if found.source == "file" else None
    return load_resolved(found, overrides, display=display) if validate else _resolved_data(found, overrides, display)


def load_resolved(found: Resolved, overrides: Sequence[str] = (), *, display: str | None = None) -> Recipe:
    """Load a recipe a reference resolved to (see `surgery.library_resolve.resolve`)."""
    trail: list[Resolved] = [found]
    data, pos = _resolved_data(found, overrides, display, trail)
    recipe = validated(data, pos)
    recipe._provenance = Provenance(trail)
    recipe._source_dir = str(found.path.parent)
    return recipe


def _resolved_data(
    found: Resolved, overrides: Sequence[str], display: str | None, trail: list[Resolved] | None = None
) -> tuple[dict[str, Any], Pos]:
    file = found.path
    source = display or display_path(file)
    text = read_recipe_file(file, source)
    data, pos = load_document(text, source, file.parent, (file,), found, trail if trail is not None else [found])
    apply_overrides(data, pos, overrides)
    return data, pos


__all__ = [
    "MAX_BYTES",
    "RECIPES_DIR",
    "Location",
    "dump_recipe",
    "field_location",
    "load_recipe",
    "load_recipe_text",
    "load_resolved",
    "override_path",
    "read_fields",
    "recipe_diff",
    "recipe_hash",
    "recipe_to_dict",
    "unvalidated_data",
]
