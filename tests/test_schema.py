"""The recipe schema documents itself, and its JSON Schema checks recipes as the loader does."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from surgery import schema as recipe_schema
from surgery.recipe import RECIPES_DIR, load_recipe, load_recipe_text, recipe_to_dict
from surgery.registry import ALL_REGISTRIES

ROOT = Path(__file__).resolve().parent.parent
MODELS = [
    cls
    for _, cls in inspect.getmembers(recipe_schema, inspect.isclass)
    if issubclass(cls, BaseModel) and cls.__module__ == recipe_schema.__name__
]
SCHEMA = recipe_schema.json_schema()


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_field_has_a_description(model: type[BaseModel]) -> None:
    missing = [name for name, field in model.model_fields.items() if not (field.description or "").strip()]
    assert missing == []


def test_every_json_schema_property_has_a_description() -> None:
    missing = []
    for name, definition in [("Recipe", SCHEMA), *SCHEMA["$defs"].items()]:
        for branch in definition.get("anyOf", [definition]):
            for prop, spec in branch.get("properties", {}).items():
                if not spec.get("description"):
                    missing.append(f"{name}.{prop}")
    assert missing == []


def test_every_model_forbids_unknown_keys() -> None:
    assert [m.__name__ for m in MODELS if m.model_config.get("extra") != "forbid"] == []


def test_registry_names_are_enums_in_the_schema() -> None:
    text = json.dumps(SCHEMA)
    for registry in ALL_REGISTRIES:
        for name in registry.names:
            assert json.dumps(name) in text, (registry.kind, name)


def test_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_schema_accepts_shipped_recipes(path: Path) -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    resolved = recipe_to_dict(load_recipe(path))
    assert [e.message for e in validator.iter_errors(resolved)] == []
    raw = yaml.safe_load(path.read_text())
    if "extends" not in raw:  # a file that extends another is completed by its base
        assert [e.message for e in validator.iter_errors(raw)] == []


def test_schema_accepts_shorthands_and_rejects_what_the_loader_rejects() -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    text = "name: s\nbackbone: {source: timm, name: test_resnet, pretrained: false}\nheads:\n  - {name: h, layers: [relu, {linear: {out_features: 2}}], loss: mse}\n"
    data = yaml.safe_load(text)
    load_recipe_text(text)
    assert list(validator.iter_errors(data)) == []
    for bad in ({"train": {"optimizer": {"name": "adamm"}}}, {"trian": {}}, {"heads": []}):
        assert list(validator.iter_errors({**data, **bad})), bad


def test_committed_schema_file_is_current() -> None:
    committed = json.loads((ROOT / "recipe.schema.json").read_text())
    assert committed == json.loads(json.dumps(SCHEMA)), (
        "recipe.schema.json is stale: run `surgery schema > recipe.schema.json`"
    )


def test_cross_check_finds_duplicate_heads() -> None:
    recipe = load_recipe_text(
        "name: s\nbackbone: {source: timm, name: t}\nheads:\n  - {name: h, layers: [relu], loss: mse}\n  - {name: g, layers: [relu], loss: mse}\n"
    )
    recipe.heads[1].name = "h"
    assert recipe_schema.cross_check(recipe) == [recipe_schema.Problem(("heads", 1, "name"), "duplicate head name 'h'")]
