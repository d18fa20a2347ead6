"""Reading recipes: YAML text → a checked `Recipe`, every problem pointing at its line.

The YAML is read with `yaml.SafeLoader`'s grammar, then turned into plain data by a small walker
of our own (instead of PyYAML's constructor) so that it can:

- remember where every key and value came from (file, line, column), so each pydantic error and
  each `cross_check` problem is reported as ``file:line:col path: message``;
- refuse any tag but the plain YAML ones (`!!python/object`, `!foo` ... are errors);
- refuse alias bombs without expanding them: it counts the values it builds and stops early.

`extends:` merges base recipes under a recipe (mappings merge key by key; lists and scalars
replace), and `--set path=value` overrides are applied last. Relative paths in
`backbone.weights`, `data.train` and `data.val` become absolute, relative to the file that
declared them.

Nothing here imports torch: `surgery validate` stays instant.
"""

from __future__ import annotations

import hashlib
import os
import re
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from surgery.errors import RecipeError
from surgery.library import SHIPPED_DIR, LibraryError, Provenance, Resolved, resolve
from surgery.registry import did_you_mean
from surgery.schema import Recipe, cross_check

RECIPES_DIR: Path = SHIPPED_DIR
"""The shipped recipe library (`surgery/shipped`, the repository's `recipes/`)."""

MAX_BYTES = 1 << 20  # a recipe is a page of YAML; 1 MiB is generous
MAX_ALIASES = 1_000  # alias references in one file
MAX_VALUES = 200_000  # values built from one file, aliases expanded
MAX_DEPTH = 64  # nesting of mappings and lists
MAX_EXTENDS = 16  # length of an `extends` chain

_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_TAG + t for t in ("str", "int", "float", "bool", "null", "timestamp")}
_PATH_FIELDS = (("backbone", "weights"), ("data", "train"), ("data", "val"))

Path_ = tuple[str | int, ...]


# --------------------------------------------------------------------------- locations


@dataclass(frozen=True)
class Location:
    """Where a value came from: a line of a file, or a `--set` override (``line`` is None)."""

    source: str
    line: int | None = None
    col: int | None = None
    field: str | None = None  # for overrides: the dotted path the override set

    def __str__(self) -> str:
        return self.source if self.line is None else f"{self.source}:{self.line}:{self.col}"


@dataclass
class _Pos:
    """Locations of a value (`here`), of its key in the parent mapping (`key`), and of its items."""

    here: Location
    key: Location | None = None
    children: dict[str | int, _Pos] = field(default_factory=dict)


def _problem(where: Location | str, message: str) -> RecipeError:
    return RecipeError([f"{where}: {message}"])


# --------------------------------------------------------------------------- YAML → data


class _Refused(Exception):
    def __init__(self, mark: Any, message: str) -> None:
        super().__init__(message)
        self.mark = mark


@dataclass
class _AliasRef:
    """An alias (`*name`) where it is used; PyYAML would hand back the anchored node itself."""

    node: yaml.Node
    mark: Any
    anchor: str


class _Loader(yaml.SafeLoader):
    """safe_load's grammar; floats may omit the dot (`3e-4`, as in YAML 1.2); aliases are counted
    and kept as `_AliasRef` so they can be located and their expansion bounded."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.alias_count = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            self.alias_count += 1
            if self.alias_count > MAX_ALIASES:
                raise _Refused(event.start_mark, f"more than {MAX_ALIASES} aliases; refusing to expand them")
            return _AliasRef(super().compose_node(parent, index), event.start_mark, event.anchor)
        return super().compose_node(parent, index)


_Loader.add_implicit_resolver(_TAG + "float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789"))
_CONSTRUCTOR = yaml.constructor.SafeConstructor()


def _tag_name(tag: str) -> str:
    return "!!" + tag[len(_TAG) :] if tag.startswith(_TAG) else tag


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return _show(value)


def _type_name(value: Any) -> str:
    """What a value is, without quoting it."""
    if value is None or isinstance(value, (bool, dict, list)):
        return _kind(value)
    return "a number" if isinstance(value, (int, float)) else "a string"


def _show(value: Any) -> str:
    """A value as the user wrote it, briefly."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Builder:
    """Turns a composed YAML node graph into plain data plus a `_Pos` tree."""

    def __init__(self, source: str, *, lines: bool = True) -> None:
        self.source = source
        self.lines = lines  # False for a `--set` value: its positions are the override itself
        self.values = 0
        self.problems: list[str] = []
        self._active: set[int] = set()
        self._aliases: list[_AliasRef] = []

    def loc(self, mark: Any) -> Location:
        return Location(self.source, mark.line + 1, mark.column + 1) if self.lines else Location(self.source)

    def build(self, node: Any, depth: int = 0) -> tuple[Any, _Pos]:
        if isinstance(node, _AliasRef):
            if id(node.node) in self._active:
                raise _Refused(node.mark, f"alias *{node.anchor} refers to a value that contains it")
            self._aliases.append(node)
            try:
                value, pos = self.build(node.node, depth)
            finally:
                self._aliases.pop()
            return value, _Pos(self.loc(node.mark), children=pos.children)
        self.values += 1
        if self.values > MAX_VALUES:
            if self._aliases:
                first = self._aliases[0]
                raise _Refused(
                    first.mark, f"alias *{first.anchor} expands to more than {MAX_VALUES} values; refusing to expand it"
                )
            raise _Refused(node.start_mark, f"more than {MAX_VALUES} values; this is not a recipe")
        if depth > MAX_DEPTH:
            raise _Refused(node.start_mark, f"nested more than {MAX_DEPTH} levels deep")
        here = self.loc(node.start_mark)
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, here), _Pos(here)
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return self._sequence(node, here, depth)
            return self._mapping(node, here, depth)
        finally:
            self._active.discard(id(node))

    def _bad_tag(self, tag: str, here: Location) -> None:
        self.problems.append(
            f"{here}: tag {_tag_name(tag)} is not allowed: a recipe is plain data (mappings, lists, strings, numbers, true/false, null)"
        )

    def _scalar(self, node: yaml.ScalarNode, here: Location) -> Any:
        if node.tag not in _SCALAR_TAGS:
            self._bad_tag(node.tag, here)
            return None
        if node.tag in (_TAG + "str", _TAG + "timestamp"):  # no field is a date: keep what was written
            return node.value
        try:
            return _CONSTRUCTOR.yaml_constructors[node.tag](_CONSTRUCTOR, node)
        except (ValueError, KeyError, TypeError):
            self.problems.append(f"{here}: {node.value!r} is not a valid {_tag_name(node.tag)}")
            return None

    def _sequence(self, node: yaml.SequenceNode, here: Location, depth: int) -> tuple[list[Any], _Pos]:
        if node.tag != _TAG + "seq":
            self._bad_tag(node.tag, here)
        items: list[Any] = []
        pos = _Pos(here)
        for i, child in enumerate(node.value):
            value, child_pos = self.build(child, depth + 1)
            items.append(value)
            pos.children[i] = child_pos
        return items, pos

    def _mapping(self, node: yaml.MappingNode, here: Location, depth: int) -> tuple[dict[str, Any], _Pos]:
        if node.tag != _TAG + "map":
            self._bad_tag(node.tag, here)
        merged: dict[str, Any] = {}
        merged_pos: dict[str | int, _Pos] = {}
        data: dict[str, Any] = {}
        pos = _Pos(here)
        for key_node, value_node in node.value:
            raw_key = key_node.node if isinstance(key_node, _AliasRef) else key_node
            key_loc = self.loc(key_node.mark if isinstance(key_node, _AliasRef) else raw_key.start_mark)
            if isinstance(raw_key, yaml.ScalarNode) and raw_key.tag == _TAG + "merge":
                self._merge_key(value_node, depth, merged, merged_pos)
                continue
            if not isinstance(raw_key, yaml.ScalarNode):
                self.problems.append(
                    f"{key_loc}: a key must be a plain name, not {'a list' if isinstance(raw_key, yaml.SequenceNode) else 'a mapping'}"
                )
                continue
            key = self._scalar(raw_key, key_loc)
            if not isinstance(key, str):
                key = raw_key.value  # `1:` or `on:` is the key "1" / "on", not a number or a bool
            if key in data:
                first = pos.children[key].key
                self.problems.append(f"{key_loc}: duplicate key {key!r} (first at line {first.line if first else '?'})")
                continue
            value, value_pos = self.build(value_node, depth + 1)
            value_pos.key = key_loc
            data[key] = value
            pos.children[key] = value_pos
        for key, value in merged.items():
            if key not in data:
                data[key] = value
                pos.children[key] = merged_pos[key]
        return data, pos

    def _merge_key(
        self, value_node: Any, depth: int, merged: dict[str, Any], merged_pos: dict[str | int, _Pos]
    ) -> None:
        """`<<: *base` or `<<: [*a, *b]`: keys of the first mapping win, explicit keys win over all."""
        value, pos = self.build(value_node, depth + 1)
        sources = (
            [(value, pos)]
            if isinstance(value, dict)
            else list(zip(value, pos.children.values(), strict=True))
            if isinstance(value, list)
            else []
        )
        if not sources or any(not isinstance(v, dict) for v, _ in sources):
            self.problems.append(f"{pos.here}: `<<` merges a mapping or a list of mappings, got {_kind(value)}")
            return
        for mapping, mapping_pos in sources:
            for key, item in mapping.items():
                if key not in merged:
                    merged[key] = item
                    merged_pos[key] = mapping_pos.children[key]


def _expanded_sizes(root: Any) -> dict[int, int]:
    """Values each node becomes once its aliases are expanded (memoised, so a bomb costs nothing)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        node = node.node if isinstance(node, _AliasRef) else node
        if id(node) in sizes or id(node) in active:  # a cycle is reported when building
            return sizes.get(id(node), 0)
        active.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        else:
            total = 1
        active.discard(id(node))
        sizes[id(node)] = total
        return total

    size(root)
    return sizes


def _refuse_bombs(root: Any) -> None:
    """Refuse, before building anything, a document that expands to more than MAX_VALUES values,
    naming the first alias (in document order) that takes it over the limit."""
    sizes = _expanded_sizes(root)
    if sizes[id(root)] <= MAX_VALUES:
        return
    count = 0
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, _AliasRef):
            count += sizes.get(id(node.node), 1)
            if count > MAX_VALUES:
                raise _Refused(
                    node.mark, f"alias *{node.anchor} takes the recipe past {MAX_VALUES} values; refusing to expand it"
                )
            continue
        count += 1
        if isinstance(node, yaml.SequenceNode):
            stack.extend(reversed(node.value))
        elif isinstance(node, yaml.MappingNode):
            stack.extend(child for pair in reversed(node.value) for child in reversed(pair))
    raise _Refused(root.start_mark, f"more than {MAX_VALUES} values; this is not a recipe")


def _parse(text: str, source: str, *, lines: bool = True) -> tuple[Any, _Pos] | None:
    """YAML text → (data, positions), or None for an empty document. Raises RecipeError."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise _problem(
            source, f"{size / 2**20:.1f} MiB is too big for a recipe (the limit is {MAX_BYTES // 2**20} MiB)"
        )
    builder = _Builder(source, lines=lines)
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _refuse_bombs(node)
            data, pos = builder.build(node)
        finally:
            loader.dispose()
    except _Refused as err:
        raise _problem(builder.loc(err.mark), str(err)) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = builder.loc(mark) if mark is not None else source
        detail = err.problem or err.context or "invalid YAML"
        if err.context and err.problem and err.context_mark is not None:
            detail += f" ({err.context} at line {err.context_mark.line + 1})"
        raise _problem(where, f"YAML syntax error: {detail}") from None
    except yaml.reader.ReaderError as err:
        code = err.character if isinstance(err.character, int) else ord(err.character)
        line = text.count("\n", 0, err.position) + 1
        col = err.position - (text.rfind("\n", 0, err.position) + 1) + 1
        where = Location(source, line, col) if lines else Location(source)
        raise _problem(where, f"character U+{code:04X} is not allowed in YAML") from None
    except RecursionError:
        raise _problem(source, "nested too deeply to be a recipe") from None
    except yaml.YAMLError as err:
        raise _problem(source, f"YAML error: {' '.join(str(err).split())}") from None
    if builder.problems:
        raise RecipeError(builder.problems)
    return data, pos


# --------------------------------------------------------------------------- files and extends


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _read(path: Path, where: Location | str) -> str:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except IsADirectoryError:
        raise _problem(where, f"{_display(path)} is a folder, not a recipe file") from None
    except OSError as err:
        raise _problem(where, f"cannot read {_display(path)}: {err.strerror or err}") from None
    if len(raw) > MAX_BYTES:
        raise _problem(where, f"{_display(path)} is over {MAX_BYTES // 2**20} MiB, too big for a recipe")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise _problem(where, f"{_display(path)} is not UTF-8 text (bad byte at offset {err.start})") from None


def _absolutize(data: dict[str, Any], base_dir: Path) -> None:
    for section, key in _PATH_FIELDS:
        part = data.get(section)
        value = part.get(key) if isinstance(part, dict) else None
        if isinstance(value, str) and value:
            expanded = os.path.expanduser(value)
            if not os.path.isabs(expanded):
                expanded = os.path.normpath(os.path.join(base_dir, expanded))
            part[key] = expanded


def _load_document(
    text: str, source: str, base_dir: Path, chain: tuple[Path, ...], origin: Resolved | None, trail: list[Resolved]
) -> tuple[dict[str, Any], _Pos]:
    """One file, its bases merged under it. `origin` says where it came from (a library recipe
    may only extend its own library); `trail` collects where every file of the chain came from."""
    parsed = _parse(text, source)
    if parsed is None:
        raise _problem(Location(source, 1, 1), "the recipe is empty (it needs at least `name`, `backbone` and `heads`)")
    data, pos = parsed
    if data is None:  # `---` alone, or `~`
        raise _problem(Location(source, 1, 1), "the recipe is empty (it needs at least `name`, `backbone` and `heads`)")
    # A file that isn't a recipe (`extends: /etc/passwd`) is refused without quoting any of it.
    if not isinstance(data, dict):
        raise _problem(
            pos.here,
            f"the top level of a recipe must be a mapping of keys (name, backbone, heads, ...), got {_type_name(data)}",
        )
    if data and not set(data) & set(Recipe.model_fields):
        raise _problem(
            Location(source, 1, 1),
            f"not a recipe: none of its {len(data)} top-level key(s) is a recipe field (name, backbone, heads, ...)",
        )
    _absolutize(data, base_dir)
    if "extends" not in data:
        return data, pos
    extends = data.pop("extends")
    extends_pos = pos.children.pop("extends")
    targets = _extends_targets(extends, extends_pos)
    merged: dict[str, Any] = {}
    merged_pos = _Pos(pos.here)
    for target, where in targets:
        try:
            found = resolve(target, base_dir, origin)
        except LibraryError as err:
            raise _problem(where, f"extends: {err}") from None
        path = found.path
        if path in chain:
            cycle = " -> ".join(_display(p) for p in (*chain[chain.index(path) :], path))
            raise _problem(where, f"extends: cycle {cycle}")
        if len(chain) >= MAX_EXTENDS:
            raise _problem(where, f"extends: chain longer than {MAX_EXTENDS} files")
        trail.append(found)
        base, base_pos = _load_document(_read(path, where), _display(path), path.parent, (*chain, path), found, trail)
        base.pop("version", None)  # a version belongs to the file that states it, not to what extends it
        base_pos.children.pop("version", None)
        merged, merged_pos = _merge(merged, merged_pos, base, base_pos)
    return _merge(merged, merged_pos, data, pos)


def read_fields(path: Path) -> dict[str, Any]:
    """The top-level keys a recipe file writes itself, without resolving `extends` or validating."""
    parsed = _parse(_read(path, _display(path)), _display(path))
    data = parsed[0] if parsed else None
    return data if isinstance(data, dict) else {}


def _extends_targets(value: Any, pos: _Pos) -> list[tuple[str, Location]]:
    items = [(value, pos)] if not isinstance(value, list) else [(v, pos.children[i]) for i, v in enumerate(value)]
    targets = []
    for item, item_pos in items:
        if not isinstance(item, str) or not item.strip():
            raise _problem(item_pos.here, f"extends: expected a recipe path or name, got {_kind(item)}")
        targets.append((item, item_pos.here))
    return targets


def _merge(base: Any, base_pos: _Pos, over: Any, over_pos: _Pos) -> tuple[Any, _Pos]:
    """Deep merge: mappings merge key by key; anything else in `over` replaces `base`."""
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return over, over_pos
    data = dict(base)
    children = dict(base_pos.children)
    for key, value in over.items():
        if key in base:
            data[key], children[key] = _merge(base[key], base_pos.children[key], value, over_pos.children[key])
        else:
            data[key], children[key] = value, over_pos.children[key]
    return data, _Pos(over_pos.here, over_pos.key, children)


# --------------------------------------------------------------------------- --set overrides

_STEP = re.compile(r"""\.?([A-Za-z_][A-Za-z0-9_-]*)|\[(-?[0-9]+)\]|\[(["'])(.*?)\3\]""")


def _parse_override(text: str) -> tuple[list[str | int], str]:
    path: list[str | int] = []
    at = 0
    while at < len(text) and text[at] != "=":
        match = _STEP.match(text, at)
        if match is None or (match.group(1) is not None and path and not match.group(0).startswith(".")):
            raise _problem(
                f"--set {text}",
                f"cannot read the path at {text[at:]!r}; expected PATH=VALUE, e.g. train.optimizer.lr=3e-4 or heads[0].loss=mse",
            )
        if match.group(1) is not None:
            if not path and match.group(0).startswith("."):
                raise _problem(f"--set {text}", "a path starts with a key, e.g. train.optimizer.lr=3e-4")
            path.append(match.group(1))
        elif match.group(2) is not None:
            path.append(int(match.group(2)))
        else:
            path.append(match.group(4))
        at = match.end()
    if at >= len(text) or not path:
        raise _problem(f"--set {text}", "expected PATH=VALUE, e.g. train.optimizer.lr=3e-4")
    if path[0] == "extends":
        raise _problem(f"--set {text}", "`extends` can only be set in a recipe file")
    if isinstance(path[0], int):
        raise _problem(f"--set {text}", "a recipe is a mapping; a path starts with a key")
    return path, text[at + 1 :]


def override_path(text: str) -> list[str | int]:
    """The field path a `--set PATH=VALUE` override writes, as keys and indices."""
    return _parse_override(text)[0]


def _apply_override(data: dict[str, Any], pos: _Pos, text: str) -> None:
    path, raw = _parse_override(text)
    label = Location(f"--set {text}", field=_dotted(path))
    parsed = _parse(raw, f"--set {text}", lines=False)
    value = None if parsed is None else parsed[0]
    node: Any = data
    node_pos = pos
    for i, step in enumerate(path):
        last = i == len(path) - 1
        here = _dotted(path[:i]) or "the recipe"
        if isinstance(step, int):
            if not isinstance(node, list):
                raise _problem(label.source, f"{here} is {_kind(node)}, not a list; cannot index it with [{step}]")
            if not -len(node) <= step < len(node):
                raise _problem(
                    label.source,
                    f"{here} has {len(node)} item{'s' if len(node) != 1 else ''}; index {step} is out of range",
                )
            step %= len(node)
        elif not isinstance(node, dict):
            raise _problem(label.source, f"{here} is {_kind(node)}, not a mapping; cannot set {step!r} in it")
        elif step not in node and not last:
            node[step] = {}
            node_pos.children[step] = _Pos(label, label)
        if last:
            node[step] = value
            node_pos.children[step] = _Pos(label, label)
        else:
            node = node[step]
            node_pos = node_pos.children.setdefault(step, _Pos(label, label))


def _apply_overrides(data: dict[str, Any], pos: _Pos, overrides: Sequence[str]) -> None:
    for override in overrides:
        _apply_override(data, pos, override)
    if overrides:
        _absolutize(data, Path.cwd())  # paths given on the command line are relative to where it runs


# --------------------------------------------------------------------------- validation and messages


def _dotted(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


def _locate(pos: _Pos, path: Path_, *, at_key: bool = False) -> Location:
    node = pos
    for part in path:
        child = node.children.get(part)
        if child is None:  # the field is missing: point at its parent mapping's key
            return node.key or node.here
        node = child
    return (node.key or node.here) if at_key else node.here


def _line(pos: _Pos, path: Path_, message: str, *, at_key: bool = False) -> tuple[Location, str]:
    where = _locate(pos, path, at_key=at_key)
    dotted = _dotted(path)
    if not dotted or (where.line is None and where.field == dotted):
        return where, f"{where}: {message}"
    return where, f"{where} {dotted}: {message}"


_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "none_required": "null",
}


def _literal_values(error: dict[str, Any]) -> list[str]:
    return re.findall(r"'((?:[^'\\]|\\.)*)'", str(error.get("ctx", {}).get("expected", "")))


def _expected(error: dict[str, Any]) -> str | None:
    if error["type"] == "literal_error":
        values = _literal_values(error)
        quoted = ", ".join(repr(v) for v in values)
        return quoted if len(values) == 1 else f"one of {quoted}"
    return _EXPECTED.get(error["type"])


def _real_path(error: dict[str, Any], data: Any) -> Path_:
    """Pydantic's `loc` without union-member tags (`int`, `literal['auto']`, ...)."""
    loc = error["loc"]
    path: list[str | int] = []
    node = data
    for i, part in enumerate(loc):
        descends = isinstance(node, dict) and part in node
        descends = descends or (isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node))
        if descends:
            node = node[part]
        elif not (i == len(loc) - 1 and error["type"] in ("missing", "extra_forbidden") and isinstance(part, str)):
            continue
        path.append(part)
    return tuple(path)


def _unwrap_model(tp: Any) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    if get_origin(tp) in (Union, types.UnionType, Annotated):
        for arg in get_args(tp):
            model = _unwrap_model(arg)
            if model is not None:
                return model
    return None


def _item_type(tp: Any, part: str | int) -> Any:
    model = _unwrap_model(tp)
    if model is not None:
        return model.model_fields[part].annotation if isinstance(part, str) and part in model.model_fields else None
    for arg in (tp, *get_args(tp)):
        origin = get_origin(arg)
        if origin is list and isinstance(part, int):
            return get_args(arg)[0]
        if origin is dict and isinstance(part, str):
            return get_args(arg)[1]
    return None


def _fields_at(path: Path_) -> list[str]:
    """Valid keys of the recipe model at `path`, for "did you mean"."""
    tp: Any = Recipe
    for part in path:
        tp = _item_type(tp, part)
        if tp is None:
            return []
    model = _unwrap_model(tp)
    return [name for name in model.model_fields if name != "extends"] if model else []


def _message(error: dict[str, Any], path: Path_) -> str:
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "missing":
        return "missing required field"
    if kind == "extra_forbidden":
        key = str(path[-1]) if path else "?"
        fields = _fields_at(path[:-1])
        hint = did_you_mean(key, fields) or (f" (valid keys: {', '.join(fields)})" if fields else "")
        return f"unknown key {key!r}{hint}"
    if kind == "literal_error":
        hint = did_you_mean(value, _literal_values(error)) if isinstance(value, str) else ""
        return f"expected {_expected(error)}, got {_show(value)}{hint}"
    expected = _expected(error)
    if expected is not None:
        return f"expected {expected}, got {_show(value)}"
    bounds = {"greater_than": ">", "greater_than_equal": "≥", "less_than": "<", "less_than_equal": "≤"}
    if kind in bounds:
        limit = next(iter(ctx.values()), "?")
        return f"must be {bounds[kind]} {limit}, got {_show(value)}"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length')} item(s), got {ctx.get('actual_length')}"
    if kind == "too_long":
        return f"takes at most {ctx.get('max_length')} item(s), got {ctx.get('actual_length')}"
    if kind == "int_parsing_size":
        return f"expected an integer of sensible size, got {_show(value)}"
    if kind == "finite_number":
        return f"must be a finite number, got {_show(value)}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_pattern_mismatch":
        return f"{_show(value)} does not match the pattern {ctx.get('pattern')}"
    message = error["msg"]
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _pydantic_problems(err: ValidationError, data: Any, pos: _Pos) -> list[tuple[Location, str]]:
    by_path: dict[Path_, list[dict[str, Any]]] = {}
    for error in err.errors(include_url=False):
        by_path.setdefault(_real_path(error, data), []).append(error)
    lines = []
    for path, errors in by_path.items():
        expected = [_expected(e) for e in errors]
        if len(errors) > 1 and all(expected) and all(e["type"] != "literal_error" or len(errors) > 1 for e in errors):
            # One value failing every member of a union: say what would have been accepted.
            alternatives = list(dict.fromkeys(x for x in expected if x))
            messages = [f"expected {' or '.join(alternatives)}, got {_show(errors[0].get('input'))}"]
        else:
            messages = list(dict.fromkeys(_message(e, path) for e in errors))
        at_key = errors[0]["type"] == "extra_forbidden"
        lines.extend(_line(pos, path, m, at_key=at_key) for m in messages)
    return lines


def _validate(data: dict[str, Any], pos: _Pos) -> Recipe:
    """Check `data` against the schema; problems are sorted by place, the recipe's own file first."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        problems = _pydantic_problems(err, data, pos)
    else:
        problems = [_line(pos, p.path, p.message) for p in cross_check(recipe)]
        if not problems:
            return recipe
    order = {s: i for i, s in enumerate(dict.fromkeys([pos.here.source, *(where.source for where, _ in problems)]))}
    problems.sort(key=lambda p: (p[0].line is None, order[p[0].source], p[0].line or 0, p[0].col or 0))
    raise RecipeError([line for _, line in problems])


# --------------------------------------------------------------------------- public API


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
    data, pos = _load_document(text, filename, base, (), None, trail)
    _apply_overrides(data, pos, overrides)
    recipe = _validate(data, pos)
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
    return _locate(pos, tuple(field))


def _load_reference(path: str | Path, overrides: Sequence[str], *, validate: bool) -> Any:
    given = str(path)
    try:
        found = resolve(given, Path.cwd())
    except LibraryError as err:
        raise _problem(given, str(err).removeprefix(f"{given} ")) from None
    display = given if found.source == "file" else None
    return load_resolved(found, overrides, display=display) if validate else _resolved_data(found, overrides, display)


def load_resolved(found: Resolved, overrides: Sequence[str] = (), *, display: str | None = None) -> Recipe:
    """Load a recipe a reference resolved to (see `surgery.library.resolve`)."""
    trail: list[Resolved] = [found]
    data, pos = _resolved_data(found, overrides, display, trail)
    recipe = _validate(data, pos)
    recipe._provenance = Provenance(trail)
    recipe._source_dir = str(found.path.parent)
    return recipe


def _resolved_data(
    found: Resolved, overrides: Sequence[str], display: str | None, trail: list[Resolved] | None = None
) -> tuple[dict[str, Any], _Pos]:
    file = found.path
    source = display or _display(file)
    text = _read(file, source)
    data, pos = _load_document(text, source, file.parent, (file,), found, trail if trail is not None else [found])
    _apply_overrides(data, pos, overrides)
    return data, pos


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
    for section, key in _PATH_FIELDS:
        part = data.get(section)
        if isinstance(part, dict) and part.get(key):
            part[key] = os.path.relpath(part[key], recipe._source_dir)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _flatten(value: Any, prefix: tuple[str | int, ...], out: dict[Path_, Any]) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(item, (*prefix, key), out)
    elif isinstance(value, list) and value:
        for i, item in enumerate(value):
            _flatten(item, (*prefix, i), out)
    else:
        out[prefix] = value


def _moved(before: dict[Path_, Any], after: dict[Path_, Any], new_dir: str | None) -> bool:
    """Whether every path that differs is the same path relative to one old recipe folder as it is
    relative to the new recipe's folder: the checkout moved, the paths did not change."""
    pairs = [(before.get(p), after.get(p)) for p in _PATH_FIELDS if before.get(p) != after.get(p)]
    if new_dir is None or not pairs or not all(isinstance(a, str) and isinstance(b, str) for a, b in pairs):
        return False
    old_dirs = {os.path.normpath(os.path.join(a, os.path.relpath(new_dir, b))) for a, b in pairs}
    if len(old_dirs) != 1:
        return False
    (old_dir,) = old_dirs
    return all(os.path.relpath(a, old_dir) == os.path.relpath(b, new_dir) for a, b in pairs)


def recipe_diff(old: Recipe, new: Recipe) -> list[tuple[str, Any, Any]]:
    """Every leaf that differs, as (dotted path, old value, new value); absent is None."""
    before: dict[Path_, Any] = {}
    after: dict[Path_, Any] = {}
    _flatten(recipe_to_dict(old), (), before)
    _flatten(recipe_to_dict(new), (), after)
    if _moved(before, after, new._source_dir):
        for path in _PATH_FIELDS:
            if path in before:
                before[path] = after[path]
    paths = list(dict.fromkeys([*before, *after]))
    return [
        (_dotted(p), before.get(p), after.get(p))
        for p in paths
        if before.get(p) != after.get(p) or (p in before) != (p in after)
    ]


__all__ = [
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
]
