"""Recipe files → plain data that remembers where every value was written.

The YAML is read with `yaml.SafeLoader`'s grammar, then turned into plain data by a small walker
of our own (instead of PyYAML's constructor) so that it can:

- remember where every key and value came from (file, line, column): a `Pos` tree beside the
  data, which `locate` walks to point a problem at its line;
- refuse any tag but the plain YAML ones (`!!python/object`, `!foo` ... are errors);
- refuse alias bombs without expanding them: it counts the values it builds and stops early.

Reading a file is bounded too (size, UTF-8), and relative paths in `backbone.weights`,
`data.train` and `data.val` become absolute, relative to the file that wrote them. This is the
bottom of the recipe language: it imports neither the schema nor the library. No torch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from surgery.errors import RecipeError

MAX_BYTES = 1 << 20  # a recipe is a page of YAML; 1 MiB is generous
MAX_ALIASES = 1_000  # alias references in one file
MAX_VALUES = 200_000  # values built from one file, aliases expanded
MAX_DEPTH = 64  # nesting of mappings and lists

_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_TAG + t for t in ("str", "int", "float", "bool", "null", "timestamp")}
PATH_FIELDS = (("backbone", "weights"), ("data", "train"), ("data", "val"), ("data", "image_root"))

FieldPath = tuple[str | int, ...]

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
class Pos:
    """Locations of a value (`here`), of its key in the parent mapping (`key`), and of its items."""

    here: Location
    key: Location | None = None
    children: dict[str | int, Pos] = field(default_factory=dict)


def problem(where: Location | str, message: str) -> RecipeError:
    """One problem, said where it is: ``where: message``."""
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


def value_kind(value: Any) -> str:
    """What a value is: "a mapping", "a list", else the value itself, briefly."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return show_value(value)


def type_name(value: Any) -> str:
    """What a value is, without quoting it."""
    if value is None or isinstance(value, (bool, dict, list)):
        return value_kind(value)
    return "a number" if isinstance(value, (int, float)) else "a string"


def show_value(value: Any) -> str:
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
    """Turns a composed YAML node graph into plain data plus a `Pos` tree."""

    def __init__(self, source: str, *, lines: bool = True) -> None:
        self.source = source
        self.lines = lines  # False for a `--set` value: its positions are the override itself
        self.values = 0
        self.problems: list[str] = []
        self._active: set[int] = set()
        self._aliases: list[_AliasRef] = []

    def loc(self, mark: Any) -> Location:
        return Location(self.source, mark.line + 1, mark.column + 1) if self.lines else Location(self.source)

    def build(self, node: Any, depth: int = 0) -> tuple[Any, Pos]:
        if isinstance(node, _AliasRef):
            if id(node.node) in self._active:
                raise _Refused(node.mark, f"alias *{node.anchor} refers to a value that contains it")
            self._aliases.append(node)
            try:
                value, pos = self.build(node.node, depth)
            finally:
                self._aliases.pop()
            return value, Pos(self.loc(node.mark), children=pos.children)
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
            return self._scalar(node, here), Pos(here)
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

    def _sequence(self, node: yaml.SequenceNode, here: Location, depth: int) -> tuple[list[Any], Pos]:
        if node.tag != _TAG + "seq":
            self._bad_tag(node.tag, here)
        items: list[Any] = []
        pos = Pos(here)
        for i, child in enumerate(node.value):
            value, child_pos = self.build(child, depth + 1)
            items.append(value)
            pos.children[i] = child_pos
        return items, pos

    def _mapping(self, node: yaml.MappingNode, here: Location, depth: int) -> tuple[dict[str, Any], Pos]:
        if node.tag != _TAG + "map":
            self._bad_tag(node.tag, here)
        merged: dict[str, Any] = {}
        merged_pos: dict[str | int, Pos] = {}
        data: dict[str, Any] = {}
        pos = Pos(here)
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

    def _merge_key(self, value_node: Any, depth: int, merged: dict[str, Any], merged_pos: dict[str | int, Pos]) -> None:
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
            self.problems.append(f"{pos.here}: `<<` merges a mapping or a list of mappings, got {value_kind(value)}")
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


def parse_yaml(text: str, source: str, *, lines: bool = True) -> tuple[Any, Pos] | None:
    """YAML text → (data, positions), or None for an empty document. Raises RecipeError."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise problem(source, f"{size / 2**20:.1f} MiB is too big for a recipe (the limit is {MAX_BYTES // 2**20} MiB)")
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
        raise problem(builder.loc(err.mark), str(err)) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = builder.loc(mark) if mark is not None else source
        detail = err.problem or err.context or "invalid YAML"
        if err.context and err.problem and err.context_mark is not None:
            detail += f" ({err.context} at line {err.context_mark.line + 1})"
        raise problem(where, f"YAML syntax error: {detail}") from None
    except yaml.reader.ReaderError as err:
        code = err.character if isinstance(err.character, int) else ord(err.character)
        line = text.count("\n", 0, err.position) + 1
        col = err.position - (text.rfind("\n", 0, err.position) + 1) + 1
        where = Location(source, line, col) if lines else Location(source)
        raise problem(where, f"character U+{code:04X} is not allowed in YAML") from None
    except RecursionError:
        raise problem(source, "nested too deeply to be a recipe") from None
    except yaml.YAMLError as err:
        raise problem(source, f"YAML error: {' '.join(str(err).split())}") from None
    if builder.problems:
        raise RecipeError(builder.problems)
    return data, pos


# --------------------------------------------------------------------------- files


def display_path(path: Path) -> str:
    """A path as a user would type it here: relative to the current folder when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def read_recipe_file(path: Path, where: Location | str) -> str:
    """A recipe file's text, read no further than the size limit; problems are said at `where`
    (the `extends:` line that named it, or the file itself)."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except IsADirectoryError:
        raise problem(where, f"{display_path(path)} is a folder, not a recipe file") from None
    except OSError as err:
        raise problem(where, f"cannot read {display_path(path)}: {err.strerror or err}") from None
    if len(raw) > MAX_BYTES:
        raise problem(where, f"{display_path(path)} is over {MAX_BYTES // 2**20} MiB, too big for a recipe")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise problem(where, f"{display_path(path)} is not UTF-8 text (bad byte at offset {err.start})") from None


def absolutize(data: dict[str, Any], base_dir: Path) -> None:
    """Make the path fields a file writes absolute, relative to `base_dir` (the file's folder)."""
    for section, key in PATH_FIELDS:
        part = data.get(section)
        value = part.get(key) if isinstance(part, dict) else None
        if isinstance(value, str) and value:
            expanded = os.path.expanduser(value)
            if not os.path.isabs(expanded):
                expanded = os.path.normpath(os.path.join(base_dir, expanded))
            part[key] = expanded


def read_fields(path: Path) -> dict[str, Any]:
    """The top-level keys a recipe file writes itself, without resolving `extends` or validating."""
    parsed = parse_yaml(read_recipe_file(path, display_path(path)), display_path(path))
    data = parsed[0] if parsed else None
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------- field paths


def dotted(path: Sequence[str | int]) -> str:
    """A field path as users write it: `heads[0].layers[1].linear`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


def locate(pos: Pos, path: FieldPath, *, at_key: bool = False) -> Location:
    """Where the field at `path` was written (its key's place with `at_key`); a missing field
    points at the nearest mapping that holds it."""
    node = pos
    for part in path:
        child = node.children.get(part)
        if child is None:  # the field is missing: point at its parent mapping's key
            return node.key or node.here
        node = child
    return (node.key or node.here) if at_key else node.here


__all__ = [
    "MAX_ALIASES",
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_VALUES",
    "PATH_FIELDS",
    "FieldPath",
    "Location",
    "Pos",
    "absolutize",
    "display_path",
    "dotted",
    "locate",
    "parse_yaml",
    "problem",
    "read_fields",
    "read_recipe_file",
    "show_value",
    "type_name",
    "value_kind",
]
