"""The recipe schema documents itself, and its JSON Schema checks recipes as the loader does."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from surgery import schema as recipe_schema
from surgery import sections
from surgery.errors import RecipeError
from surgery.recipe import RECIPES_DIR, load_recipe, load_recipe_text, recipe_to_dict
from surgery.registry import ALL_REGISTRIES

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = [importlib.import_module(f"{sections.__name__}.{m.name}") for m in pkgutil.iter_modules(sections.__path__)]
MODELS = [
    cls
    for module in SECTIONS
    for _, cls in inspect.getmembers(module, inspect.isclass)
    if issubclass(cls, BaseModel) and cls.__module__ == module.__name__
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


@pytest.mark.parametrize(
    ("key", "instead"),
    [
        ("trust_remote_code", "remote code is never run"),
        ("checkpoint_path", "`backbone.weights:`"),
        ("pretrained", "`backbone.pretrained: true`"),
        ("pretrained_cfg_overlay", "`backbone.weights:`"),
        ("cache_dir", "HF_HOME"),
        ("token", "HF_TOKEN"),
        ("local_files_only", "HF_HUB_OFFLINE=1"),
        ("revision", "`backbone.revision`"),
        ("weights", "`backbone.weights:`"),
        ("progress", "not a model setting"),
        ("_fast_init", "private arguments"),
    ],
)
def test_plumbing_kwargs_are_refused_at_their_line_with_the_field_to_use(key: str, instead: str) -> None:
    text = f"name: x\nbackbone:\n  source: timm\n  name: test_resnet\n  kwargs:\n    drop_rate: 0.1\n    {key}: true\nheads: [{{name: a, layers: [{{linear: {{out_features: 2}}}}], loss: mse}}]\n"
    with pytest.raises(RecipeError) as caught:
        load_recipe_text(text, filename="r.yaml")
    (line,) = caught.value.problems
    assert line.startswith("r.yaml:7:") and f"backbone.kwargs.{key}: " in line
    assert instead in line


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("heads[0].layers[0].linear.out_features=2147483648", "must be ≤ 1048576, got 2147483648"),
        ("heads[0].layers[0].linear.out_features=9223372036854775808", "must be ≤ 1048576"),
        ("input.size=[1e30, 16]", "input.size[0]: expected an integer of sensible size"),
        ("input.size=[100000, 16]", "input.size[0]: must be ≤ 16384"),
        ("train.seed=1e30", "expected an integer of sensible size, got 1e+30"),
        ("train.seed=-1", "must be ≥ 0, got -1"),
        ("train.optimizer.lr=.inf", "must be a finite number, got inf"),
        ("train.optimizer.lr=.nan", "must be a finite number, got nan"),
        ("train.epochs=99999999999", "must be ≤ 2147483647, got 99999999999"),
        ("data.synthetic.num_samples=10000000000", "must be ≤ 1000000, got 10000000000"),
    ],
)
def test_numbers_that_cannot_be_built_do_not_validate(override: str, message: str) -> None:
    with pytest.raises(RecipeError) as caught:
        load_recipe("quickstart", [override, "data.source=synthetic"])
    assert message in str(caught.value)
