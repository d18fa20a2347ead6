"""Composing a recipe from its files: `extends:` merges base recipes under a recipe (mappings
merge key by key; lists and scalars replace), then `--set path=value` overrides are applied.
Every merged value keeps the position it was written at. Bases are found through the library's
resolver (`surgery.library_resolve`), which never loads a recipe. No torch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from surgery.library_fetch import LibraryError
from surgery.library_resolve import Resolved, resolve
from surgery.recipe_yaml import (
    PATH_FIELDS,
    Location,
    Pos,
    absolutize,
    display_path,
    dotted,
    locate,
    parse_yaml,
    problem,
    read_recipe_file,
    type_name,
    value_kind,
)
from surgery.schema import Recipe

MAX_EXTENDS = 16  # length of an `extends` chain


# --------------------------------------------------------------------------- extends


def load_document(
    text: str, source: str, base_dir: Path, chain: tuple[Path, ...], origin: Resolved | None, trail: list[Resolved]
) -> tuple[dict[str, Any], Pos]:
    """One file, its bases merged under it. `origin` says where it came from (a library recipe
    may only extend its own library); `trail` collects where every file of the chain came from."""
    parsed = parse_yaml(text, source)
    if parsed is None:
        raise problem(Location(source, 1, 1), "the recipe is empty (it needs at least `name`, `backbone` and `heads`)")
    data, pos = parsed
    if data is None:  # `---` alone, or `~`
        raise problem(Location(source, 1, 1), "the recipe is empty (it needs at least `name`, `backbone` and `heads`)")
    # A file that isn't a recipe (`extends: /etc/passwd`) is refused without quoting any of it.
    if not isinstance(data, dict):
        raise problem(
            pos.here,
            f"the top level of a recipe must be a mapping of keys (name, backbone, heads, ...), got {type_name(data)}",
        )
    if data and not set(data) & set(Recipe.model_fields):
        raise problem(
            Location(source, 1, 1),
            f"not a recipe: none of its {len(data)} top-level key(s) is a recipe field (name, backbone, heads, ...)",
        )
    absolutize(data, base_dir)
    if origin is not None and origin.root is not None:
        _confine(data, pos, origin.root, origin.source)
    if "extends" not in data:
        return data, pos
    extends = data.pop("extends")
    extends_pos = pos.children.pop("extends")
    targets = _extends_targets(extends, extends_pos)
    merged: dict[str, Any] = {}
    merged_pos = Pos(pos.here)
    for target, where in targets:
        try:
            found = resolve(target, base_dir, origin)
        except LibraryError as err:
            raise problem(where, f"extends: {err}") from None
        path = found.path
        if path in chain:
            cycle = " -> ".join(display_path(p) for p in (*chain[chain.index(path) :], path))
            raise problem(where, f"extends: cycle {cycle}")
        if len(chain) >= MAX_EXTENDS:
            raise problem(where, f"extends: chain longer than {MAX_EXTENDS} files")
        trail.append(found)
        base, base_pos = load_document(
            read_recipe_file(path, where), display_path(path), path.parent, (*chain, path), found, trail
        )
        base.pop("version", None)  # a version belongs to the file that states it, not to what extends it
        base_pos.children.pop("version", None)
        merged, merged_pos = _merge(merged, merged_pos, base, base_pos)
    return _merge(merged, merged_pos, data, pos)


def _confine(data: dict[str, Any], pos: Pos, root: Path, library: str) -> None:
    """The files a library's recipe names (data, weights) must lie inside its library, symlinks
    resolved: a recipe fetched from elsewhere may not point training at the rest of the disk."""
    real_root = root.resolve()
    for section, key in PATH_FIELDS:
        part = data.get(section)
        value = part.get(key) if isinstance(part, dict) else None
        if isinstance(value, str) and value and not Path(value).resolve().is_relative_to(real_root):
            raise problem(
                locate(pos, (section, key)),
                f"{section}.{key}: {value!r} is outside library {library}; "
                "a library's recipe may only name files inside it",
            )


def _extends_targets(value: Any, pos: Pos) -> list[tuple[str, Location]]:
    items = [(value, pos)] if not isinstance(value, list) else [(v, pos.children[i]) for i, v in enumerate(value)]
    targets = []
    for item, item_pos in items:
        if not isinstance(item, str) or not item.strip():
            raise problem(item_pos.here, f"extends: expected a recipe path or name, got {value_kind(item)}")
        targets.append((item, item_pos.here))
    return targets


def _merge(base: Any, base_pos: Pos, over: Any, over_pos: Pos, path: tuple[str, ...] = ()) -> tuple[Any, Pos]:
    """Deep merge: mappings merge key by key; anything else in `over` replaces `base`. A search
    domain (`tune.space[<path>]`) is one value, not a mapping of settings: re-searching a path
    replaces the base's domain (merged, `{loguniform: ..., choice: ...}` would be two domains)."""
    if not (isinstance(base, dict) and isinstance(over, dict)) or _is_domain(path):
        return over, over_pos
    data = dict(base)
    children = dict(base_pos.children)
    for key, value in over.items():
        if key in base:
            data[key], children[key] = _merge(
                base[key], base_pos.children[key], value, over_pos.children[key], (*path, str(key))
            )
        else:
            data[key], children[key] = value, over_pos.children[key]
    return data, Pos(over_pos.here, over_pos.key, children)


def _is_domain(path: tuple[str, ...]) -> bool:
    return len(path) == 3 and path[:2] == ("tune", "space")


# --------------------------------------------------------------------------- --set overrides

_STEP = re.compile(r"""\.?([A-Za-z_][A-Za-z0-9_-]*)|\[(-?[0-9]+)\]|\[(["'])(.*?)\3\]""")


def _parse_override(text: str) -> tuple[list[str | int], str]:
    path: list[str | int] = []
    at = 0
    while at < len(text) and text[at] != "=":
        match = _STEP.match(text, at)
        if match is None or (match.group(1) is not None and path and not match.group(0).startswith(".")):
            raise problem(
                f"--set {text}",
                f"cannot read the path at {text[at:]!r}; expected PATH=VALUE, e.g. train.optimizer.lr=3e-4 or heads[0].loss=mse",
            )
        if match.group(1) is not None:
            if not path and match.group(0).startswith("."):
                raise problem(f"--set {text}", "a path starts with a key, e.g. train.optimizer.lr=3e-4")
            path.append(match.group(1))
        elif match.group(2) is not None:
            path.append(int(match.group(2)))
        else:
            path.append(match.group(4))
        at = match.end()
    if at >= len(text) or not path:
        raise problem(f"--set {text}", "expected PATH=VALUE, e.g. train.optimizer.lr=3e-4")
    if path[0] == "extends":
        raise problem(f"--set {text}", "`extends` can only be set in a recipe file")
    if isinstance(path[0], int):
        raise problem(f"--set {text}", "a recipe is a mapping; a path starts with a key")
    return path, text[at + 1 :]


def override_path(text: str) -> list[str | int]:
    """The field path a `--set PATH=VALUE` override writes, as keys and indices."""
    return _parse_override(text)[0]


def _apply_override(data: dict[str, Any], pos: Pos, text: str) -> None:
    path, raw = _parse_override(text)
    label = Location(f"--set {text}", field=dotted(path))
    parsed = parse_yaml(raw, f"--set {text}", lines=False)
    value = None if parsed is None else parsed[0]
    node: Any = data
    node_pos = pos
    for i, step in enumerate(path):
        last = i == len(path) - 1
        here = dotted(path[:i]) or "the recipe"
        if isinstance(step, int):
            if not isinstance(node, list):
                raise problem(label.source, f"{here} is {value_kind(node)}, not a list; cannot index it with [{step}]")
            if not -len(node) <= step < len(node):
                raise problem(
                    label.source,
                    f"{here} has {len(node)} item{'s' if len(node) != 1 else ''}; index {step} is out of range",
                )
            step %= len(node)
        elif not isinstance(node, dict):
            raise problem(label.source, f"{here} is {value_kind(node)}, not a mapping; cannot set {step!r} in it")
        elif step not in node and not last:
            node[step] = {}
            node_pos.children[step] = Pos(label, label)
        if last:
            node[step] = value
            node_pos.children[step] = Pos(label, label)
        else:
            node = node[step]
            node_pos = node_pos.children.setdefault(step, Pos(label, label))


def apply_overrides(data: dict[str, Any], pos: Pos, overrides: Sequence[str]) -> None:
    """Apply `--set PATH=VALUE` overrides in order; each value is located at its override."""
    for override in overrides:
        _apply_override(data, pos, override)
    if overrides:
        absolutize(data, Path.cwd())  # paths given on the command line are relative to where it runs


__all__ = ["MAX_EXTENDS", "apply_overrides", "load_document", "override_path"]
