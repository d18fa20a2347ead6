"""Checking recipe data against the schema, every problem located: a pydantic error or a
`cross_check` problem becomes ``file:line:col path: message``, with "did you mean" for unknown
keys and names, and a union's failures said once as what would have been accepted. No torch.
"""

from __future__ import annotations

import re
import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from surgery.errors import RecipeError
from surgery.recipe_yaml import FieldPath, Location, Pos, dotted, locate, show_value
from surgery.registry import did_you_mean
from surgery.schema import Recipe, cross_check


def _line(pos: Pos, path: FieldPath, message: str, *, at_key: bool = False) -> tuple[Location, str]:
    where = locate(pos, path, at_key=at_key)
    shown = dotted(path)
    if not shown or (where.line is None and where.field == shown):
        return where, f"{where}: {message}"
    return where, f"{where} {shown}: {message}"


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


def _real_path(error: dict[str, Any], data: Any) -> FieldPath:
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


def _fields_at(path: FieldPath) -> list[str]:
    """Valid keys of the recipe model at `path`, for "did you mean"."""
    tp: Any = Recipe
    for part in path:
        tp = _item_type(tp, part)
        if tp is None:
            return []
    model = _unwrap_model(tp)
    return [name for name in model.model_fields if name != "extends"] if model else []


def _message(error: dict[str, Any], path: FieldPath) -> str:
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
        return f"expected {_expected(error)}, got {show_value(value)}{hint}"
    expected = _expected(error)
    if expected is not None:
        return f"expected {expected}, got {show_value(value)}"
    bounds = {"greater_than": ">", "greater_than_equal": "≥", "less_than": "<", "less_than_equal": "≤"}
    if kind in bounds:
        limit = next(iter(ctx.values()), "?")
        return f"must be {bounds[kind]} {limit}, got {show_value(value)}"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length')} item(s), got {ctx.get('actual_length')}"
    if kind == "too_long":
        return f"takes at most {ctx.get('max_length')} item(s), got {ctx.get('actual_length')}"
    if kind == "int_parsing_size":
        return f"expected an integer of sensible size, got {show_value(value)}"
    if kind == "finite_number":
        return f"must be a finite number, got {show_value(value)}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_pattern_mismatch":
        return f"{show_value(value)} does not match the pattern {ctx.get('pattern')}"
    message = error["msg"]
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _pydantic_problems(err: ValidationError, data: Any, pos: Pos) -> list[tuple[Location, str]]:
    by_path: dict[FieldPath, list[dict[str, Any]]] = {}
    for error in err.errors(include_url=False):
        by_path.setdefault(_real_path(error, data), []).append(error)
    lines = []
    for path, errors in by_path.items():
        expected = [_expected(e) for e in errors]
        if len(errors) > 1 and all(expected) and all(e["type"] != "literal_error" or len(errors) > 1 for e in errors):
            # One value failing every member of a union: say what would have been accepted.
            alternatives = list(dict.fromkeys(x for x in expected if x))
            messages = [f"expected {' or '.join(alternatives)}, got {show_value(errors[0].get('input'))}"]
        else:
            messages = list(dict.fromkeys(_message(e, path) for e in errors))
        at_key = errors[0]["type"] == "extra_forbidden"
        lines.extend(_line(pos, path, m, at_key=at_key) for m in messages)
    return lines


def validated(data: dict[str, Any], pos: Pos) -> Recipe:
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


__all__ = ["validated"]
