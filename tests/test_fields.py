"""Every recipe field has its effect tested.

`FIELD_TESTS` maps each leaf field of the schema (walked from `surgery.schema.Recipe`) to the tests
that show it changes behaviour, or is refused where it cannot. A field added to the schema without
an entry fails `test_every_field_has_a_test_of_its_effect` with its name; an entry naming a test
that does not exist fails too. The tests below are the fields' own where no other module's test
shows their effect: fast, on tiny models and data.
"""

from __future__ import annotations

import ast
import json
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image
from pydantic import BaseModel
from torch import nn

from surgery.data import ExampleDataset, Examples, build_augmentations, load_data
from surgery.errors import RecipeError
from surgery.inputs import InputSpec
from surgery.model import build_model
from surgery.placement import SingleDevice
from surgery.recipe import load_recipe_text
from surgery.schema import LayerSpec, Recipe

TESTS = Path(__file__).resolve().parent
CPU = SingleDevice(torch.device("cpu"))

TINY = """
name: fields
backbone: {source: timm, name: test_resnet, pretrained: false}
input: {size: [16, 16]}
heads: [{name: cls, layers: [{linear: {out_features: 2}}], loss: cross_entropy, metrics: [accuracy]}]
data: {source: synthetic, batch_size: 8, synthetic: {num_samples: 32, num_classes: 2}}
train: {epochs: 1}
monitor: {progress: none, graph: false, histograms: false, sample_predictions: 0}
"""


def tiny(*overrides: str, text: str = TINY) -> Recipe:
    return load_recipe_text(text, overrides=overrides)


# --------------------------------------------------------------------------- optimizer and schedule


def _weights_after_steps(recipe: Recipe, steps: int = 3) -> torch.Tensor:
    """The head's weights after `steps` optimizer steps on gradients that differ every step."""
    from surgery.optim import build_optimizer

    model = build_model(recipe, load_weights=False)
    optimizer = build_optimizer(model, recipe)
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator) * 0.1
        optimizer.step()
    return model.heads.cls[0].weight.detach().clone()


@pytest.mark.parametrize(
    ("base", "changed"),
    [
        ("train.optimizer.name=sgd", "train.optimizer.name=adamw"),
        ("train.optimizer.lr=0.001", "train.optimizer.lr=0.01"),
        ("train.optimizer.weight_decay=0", "train.optimizer.weight_decay=0.5"),
        ("train.optimizer.name=sgd", "train.optimizer.momentum=0.5"),
        ("train.optimizer.momentum=0.9", "train.optimizer.nesterov=true"),
        ("train.optimizer.betas=[0.9, 0.999]", "train.optimizer.betas=[0.5, 0.9]"),
        ("train.optimizer.eps=1e-8", "train.optimizer.eps=1.0"),
    ],
)
def test_optimizer_settings_change_the_steps(base: str, changed: str) -> None:
    name = "sgd" if "momentum" in changed or "nesterov" in changed or "name=sgd" in base else "adamw"
    first = tiny(f"train.optimizer.name={name}", base)
    second = tiny(f"train.optimizer.name={name}", base, changed)
    assert not torch.allclose(_weights_after_steps(first), _weights_after_steps(second))


def test_nesterov_without_momentum_sgd_is_refused() -> None:
    with pytest.raises(
        RecipeError, match=r"nesterov=true: nesterov momentum applies to sgd with momentum > 0, not adamw"
    ):
        tiny("train.optimizer.name=adamw", "train.optimizer.nesterov=true")
    with pytest.raises(RecipeError, match="not sgd with momentum 0"):
        tiny("train.optimizer.name=sgd", "train.optimizer.momentum=0", "train.optimizer.nesterov=true")


def _learning_rates(*overrides: str, total: int = 12, per_epoch: int = 2) -> list[float]:
    from surgery.optim import build_optimizer, build_scheduler

    recipe = tiny("train.optimizer.lr=1.0", *overrides)
    optimizer = build_optimizer(build_model(recipe, load_weights=False), recipe)
    scheduler = build_scheduler(optimizer, recipe, total_steps=total, steps_per_epoch=per_epoch)
    rates = []
    for _ in range(total):
        rates.append(round(optimizer.param_groups[0]["lr"], 6))
        optimizer.step()
        scheduler.step()
    return rates


def test_schedules_follow_their_settings() -> None:
    assert _learning_rates() == [1.0] * 12  # constant
    # step: ×gamma every step_epochs epochs (2 steps an epoch)
    assert (
        _learning_rates("train.scheduler.name=step", "train.scheduler.step_epochs=2")
        == [1.0] * 4 + [0.1] * 4 + [0.01] * 4
    )
    assert _learning_rates("train.scheduler.name=step", "train.scheduler.step_epochs=3") == [1.0] * 6 + [0.1] * 6
    stepped = _learning_rates("train.scheduler.name=step", "train.scheduler.step_epochs=2", "train.scheduler.gamma=0.5")
    assert stepped == [1.0] * 4 + [0.5] * 4 + [0.25] * 4
    assert _learning_rates("train.scheduler.warmup_steps=3")[:4] == [0.25, 0.5, 0.75, 1.0]
    assert _learning_rates("train.scheduler.name=linear")[-1] == pytest.approx(1 / 12, abs=1e-6)
    assert _learning_rates("train.scheduler.name=linear", "train.scheduler.min_lr=0.5")[-1] == pytest.approx(
        0.5 + 0.5 / 12, abs=1e-6
    )
    assert _learning_rates("train.scheduler.name=cosine") != _learning_rates("train.scheduler.name=linear")


def test_clip_grad_norm_clips_the_step_to_its_norm() -> None:
    from surgery.optim import build_optimizer
    from surgery.train_step import clip_gradients

    recipe = tiny()
    model = build_model(recipe, load_weights=False)
    optimizer = build_optimizer(model, recipe)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = clip_gradients(model, optimizer, scaler, 0.5)
    after = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert float(before) > 1.0 and float(after) == pytest.approx(0.5, rel=1e-4)


def test_early_stopping_mode_max_wants_the_metric_to_rise() -> None:
    from surgery.train_eval import _early_stop
    from surgery.train_state import TrainState

    recipe = tiny("train.early_stopping={monitor: val/loss, mode: max, patience: 1}")
    state = TrainState(metrics={"val/loss": 1.0})
    assert not _early_stop(state, recipe, epochs_done=1)
    state.metrics["val/loss"] = 2.0  # higher: an improvement when maximising
    assert not _early_stop(state, recipe, epochs_done=2)
    state.metrics["val/loss"] = 0.5
    assert _early_stop(state, recipe, epochs_done=3)


# --------------------------------------------------------------------------- what a run writes


def test_loop_settings_shape_what_a_run_writes(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from surgery.checkpoint import read_index
    from surgery.train import fit

    # 4 steps an epoch, 3 epochs: validation after epochs 2 and 3 only, checkpoints only at the end,
    # training scalars every 3 steps, TensorBoard without histograms, graph or images
    recipe = tiny(
        "train.epochs=3",
        "train.eval_every_epochs=2",
        "train.checkpoint={every_epoch: false, keep_best: 10}",
        "monitor.log_every_steps=3",
        "monitor.sample_predictions=0",
    )
    fit(recipe, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "val/loss" in line] == [8, 12]
    assert [line["step"] for line in lines if "train/loss" in line] == [3, 6, 9, 12]
    assert [name for name, _ in read_index(tmp_path / "run")["best"]] == ["step-00000012"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.is_dir()) == ["step-00000012"]
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    tags = events.Tags()
    assert "train/loss" in tags["scalars"]
    assert not tags["histograms"] and not tags["graph"] and "val/predictions" not in tags["images"]
    fit(tiny("monitor.tensorboard=false"), tmp_path / "quiet")
    assert not (tmp_path / "quiet" / "tb").exists() and (tmp_path / "quiet" / "metrics.jsonl").is_file()


# --------------------------------------------------------------------------- data


def test_loader_settings_reach_the_loaders() -> None:
    model = build_model(tiny(), load_weights=False)
    plain = load_data(tiny(), model, CPU)
    assert (plain.num_train, plain.num_val) == (32, 8)
    assert plain.val.batch_size == 8 and plain.train.num_workers == 0 and not plain.train.pin_memory
    data = load_data(
        tiny(
            "data.eval_batch_size=3",
            "data.pin_memory=true",
            "data.num_workers=1",
            "data.limit_train=20",
            "data.limit_val=5",
        ),
        model,
        CPU,
    )
    assert (data.num_train, data.num_val) == (20, 5)
    assert [len(t["cls"]) for _, t in data.val] == [3, 2]
    assert data.train.pin_memory and data.val.pin_memory
    assert data.train.num_workers == 1 and data.val.num_workers == 1


def test_shuffle_and_drop_last_decide_each_epochs_batches() -> None:
    model = build_model(tiny(), load_weights=False)

    def order(*overrides: str) -> list[list[int]]:
        data = load_data(tiny("data.synthetic.num_samples=30", *overrides), model, CPU)
        return [[i for _, i in batch] for batch in data.sampler]

    assert order() != order("data.shuffle=false")
    assert order("data.shuffle=false")[0] == list(range(8))
    assert [len(b) for b in order("data.shuffle=false")] == [8, 8, 8, 6]
    assert [len(b) for b in order("data.shuffle=false", "data.drop_last=true")] == [8, 8, 8]


def test_label_column_and_head_target_pick_the_columns(tmp_path: Path) -> None:
    from test_data import table_recipe, vector_model

    rows = [
        {"x": i, "y": i, "z": i, "kind": "odd" if i % 2 else "even", "size": "big" if i > 4 else "small"}
        for i in range(8)
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    by_kind = load_data(
        table_recipe("jsonl", path, feature_columns=["x", "y", "z"], label_column="kind"), vector_model(), CPU
    )
    assert by_kind.class_names["cls"] == ["even", "odd"]
    recipe = table_recipe("jsonl", path, feature_columns=["x", "y", "z"], label_column="kind")
    recipe.heads[0].target = "size"  # a head's own column wins over data.label_column
    assert load_data(recipe, vector_model(), CPU).class_names["cls"] == ["big", "small"]


def _rgb_dataset(augment: list[Any]) -> ExampleDataset:
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(4, 16, 16, 3, generator=generator) * 255).to(torch.uint8).numpy()
    images = [Image.fromarray(p, "RGB") for p in pixels]
    spec = InputSpec(kind="image", channels=3, size=(16, 16), mean=(0.5,), std=(0.25,))
    recipe = tiny(f"data.augment={json.dumps(augment)}")
    examples = Examples("image", images, {"cls": torch.zeros(4, dtype=torch.long)})
    return ExampleDataset(examples, spec, build_augmentations(recipe.data.augment, spec), seed=0)


def _augmented(augment: list[Any]) -> torch.Tensor:
    dataset = _rgb_dataset(augment)
    return torch.stack([dataset[(0, i)][0][0] for i in range(4)])


@pytest.mark.parametrize(
    ("unchanged", "changed"),
    [
        ([{"hflip": {"p": 0.0}}], [{"hflip": {"p": 1.0}}]),
        ([{"vflip": {"p": 0.0}}], [{"vflip": {"p": 1.0}}]),
        ([{"random_crop": {"padding": 0}}], [{"random_crop": {"padding": 6}}]),
        ([{"rotate": {"degrees": 0}}], [{"rotate": {"degrees": 40}}]),
        (
            [{"random_resized_crop": {"scale": [1, 1], "ratio": [1, 1]}}],
            [{"random_resized_crop": {"scale": [0.2, 0.5]}}],
        ),
        (
            [{"random_resized_crop": {"scale": [1, 1], "ratio": [1, 1]}}],
            [{"random_resized_crop": {"scale": [1, 1], "ratio": [0.3, 0.4]}}],
        ),
        (
            [{"color_jitter": {"brightness": 0, "contrast": 0, "saturation": 0}}],
            [{"color_jitter": {"brightness": 0.8, "contrast": 0, "saturation": 0}}],
        ),
        (
            [{"color_jitter": {"brightness": 0, "contrast": 0, "saturation": 0}}],
            [{"color_jitter": {"brightness": 0, "contrast": 0.8, "saturation": 0}}],
        ),
        (
            [{"color_jitter": {"brightness": 0, "contrast": 0, "saturation": 0}}],
            [{"color_jitter": {"brightness": 0, "contrast": 0, "saturation": 0.8}}],
        ),
        ([], [{"gaussian_noise": {"std": 0.5}}]),
    ],
)
def test_each_augmentation_and_its_settings_change_the_training_images(
    unchanged: list[Any], changed: list[Any]
) -> None:
    plain = _augmented([])
    assert torch.equal(_augmented(unchanged), plain)  # settings that leave the image alone do
    assert not torch.equal(_augmented(changed), plain)


def test_flips_with_p_1_flip_every_image() -> None:
    plain = _augmented([])
    assert torch.equal(_augmented([{"hflip": {"p": 1.0}}]), plain.flip(-1))
    assert torch.equal(_augmented([{"vflip": {"p": 1.0}}]), plain.flip(-2))


# --------------------------------------------------------------------------- model


def test_head_layer_settings_build_what_they_say() -> None:
    def layer(spec: Any, shape: tuple[int, ...] = (2, 12)) -> nn.Module:
        from surgery.heads import build_layer

        return build_layer(LayerSpec.model_validate(spec), shape)

    assert layer({"linear": {"out_features": 3}}).bias is not None
    assert layer({"linear": {"out_features": 3, "bias": False}}).bias is None
    assert layer({"conv1x1": {"out_channels": 3, "bias": False}}, (2, 6, 4, 4)).bias is None
    mlp = layer(
        {"mlp": {"hidden": [5, 4], "out_features": 3, "activation": "tanh", "norm": "batchnorm", "dropout": 0.3}}
    )
    kinds = [type(m).__name__ for m in mlp.modules() if not list(m.children())]
    assert kinds == ["Linear", "BatchNorm1d", "Tanh", "Dropout", "Linear", "BatchNorm1d", "Tanh", "Dropout", "Linear"]
    assert [m.p for m in mlp.modules() if isinstance(m, nn.Dropout)] == [0.3, 0.3]
    assert [m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)] == [5, 4, 3]
    plain = layer({"mlp": {"hidden": [5], "out_features": 3}})
    assert [type(m).__name__ for m in plain.modules() if not list(m.children())] == ["Linear", "GELU", "Linear"]
    assert layer({"mlp": {"hidden": [5], "out_features": 3, "norm": "layernorm"}})[1].__class__ is nn.LayerNorm
    assert layer({"dropout": {"p": 0.7}}).p == 0.7
    assert layer({"layernorm": {"eps": 0.01}}, (2, 5, 12)).eps == 0.01
    assert layer({"batchnorm": {"eps": 0.02}}, (2, 6, 4, 4)).eps == 0.02


def test_lora_settings_reach_the_adapters(tiny_bert: Path) -> None:
    text = f"""
name: lora
backbone: {{source: transformers, name: {tiny_bert}, pretrained: false}}
surgery: [{{lora: {{targets: ["encoder.layer.*.attention.self.query"], r: 4, alpha: 2.0, dropout: 0.25}}}}]
heads: [{{name: cls, input: tokens, layers: [{{linear: {{out_features: 2}}}}], loss: cross_entropy}}]
"""
    model = build_model(load_recipe_text(text), load_weights=False)
    adapted = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "scaling")]
    assert len(adapted) == 2  # the query of each of the 2 layers
    for module in adapted:
        assert module.lora_A["default"].out_features == 4
        assert module.scaling["default"] == pytest.approx(2.0 / 4)
        assert module.lora_dropout["default"].p == 0.25


def test_backbone_revision_is_asked_of_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    asked: dict[str, Any] = {}

    class Asked(Exception):
        pass

    def from_pretrained(source: str, **kwargs: Any) -> Any:
        asked.update(kwargs, source=source)
        raise Asked

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    recipe = load_recipe_text(
        "name: hub\nbackbone: {source: transformers, name: some-org/some-model, revision: v2.1, pretrained: false}\n"
        "heads: [{name: cls, input: tokens, layers: [{linear: {out_features: 2}}], loss: cross_entropy}]\n"
    )
    with pytest.raises(Asked):
        build_model(recipe, load_weights=False)
    assert asked["source"] == "some-org/some-model" and asked["revision"] == "v2.1"


# --------------------------------------------------------------------------- tune


def test_asha_settings_reach_the_scheduler() -> None:
    from surgery.tune import _scheduler

    text = TINY + "tune: {space: {train.optimizer.lr: {choice: [0.1, 0.2]}}, scheduler: asha}\n"
    default = _scheduler(load_recipe_text(text).tune, 10)
    tuned = load_recipe_text(text.replace("asha}", "asha, grace_period: 3, reduction_factor: 2}")).tune
    changed = _scheduler(tuned, 10)

    def grace(scheduler: Any) -> int:  # the first rung ASHA can stop a trial at
        return min(milestone for milestone, _ in scheduler._brackets[0]._rungs)

    assert (grace(default), default._reduction_factor) == (1, 3.0)
    assert (grace(changed), changed._reduction_factor) == (3, 2.0)


def test_time_budget_reaches_the_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray import tune

    import surgery.tune
    from surgery.tune import tune_command

    seen: dict[str, Any] = {}

    class Started(Exception):
        pass

    def tuner(trainable: Any, *, param_space: Any, tune_config: Any, run_config: Any) -> Any:
        seen["time_budget_s"] = tune_config.time_budget_s
        raise Started

    import ray

    monkeypatch.setattr(surgery.tune, "_start_ray", lambda: False)  # no Ray: the search stops where it would start
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(tune, "with_parameters", lambda trainable, **kwargs: trainable)
    monkeypatch.setattr(tune, "with_resources", lambda trainable, resources: trainable)
    monkeypatch.setattr(tune, "Tuner", tuner)
    path = tmp_path / "fields.yaml"
    path.write_text(TINY + "tune: {space: {train.optimizer.lr: {choice: [0.1, 0.2]}}, time_budget_s: 42}\n")
    with pytest.raises(Started):
        tune_command(path, [], runs_root=tmp_path / "runs")
    assert seen["time_budget_s"] == 42


def test_the_search_seed_decides_the_points_tried() -> None:
    from surgery.tune import Dimension, _searcher

    def points(seed: int) -> list[Any]:
        space = "{train.optimizer.lr: {loguniform: [1.0e-4, 1.0e-1]}}"
        recipe = load_recipe_text(TINY + f"tune: {{search: optuna, seed: {seed}, space: {space}}}\n")
        searcher = _searcher(recipe.tune, 1)
        searcher.set_search_properties(
            "val/loss", "min", {p: Dimension.of(p, d).ray_domain() for p, d in recipe.tune.space.items()}
        )
        tried = []
        for i in range(3):
            tried.append(searcher.suggest(f"t{i}"))
            searcher.on_trial_complete(f"t{i}", {"val/loss": 1.0})
        return tried

    assert points(0) == points(0) and points(0) != points(1)


@pytest.mark.parametrize("export_best", [True, False])
def test_export_best_exports_the_best_trials_bundle_or_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, export_best: bool
) -> None:
    import surgery.export
    import surgery.tune
    from surgery.tune import TrialRow

    exported: list[Path] = []
    run_dir = tmp_path / "search" / "trial_0"
    run_dir.mkdir(parents=True)
    best = TrialRow("trial_0", {"train.optimizer.lr": 0.1}, "finished", 0.5, 1, 1, run_dir)
    monkeypatch.setattr(surgery.tune, "collect_trials", lambda folder, metric, mode: [best])
    monkeypatch.setattr(surgery.tune, "write_tuned_recipe", lambda *args, **kwargs: None)
    monkeypatch.setattr(surgery.export, "export_run", lambda run: exported.append(run) or run / "bundle")
    recipe = load_recipe_text(
        TINY
        + f"tune: {{space: {{train.optimizer.lr: {{choice: [0.1, 0.2]}}}}, export_best: {str(export_best).lower()}}}\n"
    )
    plan = SimpleNamespace(metric="val/loss", mode="min", recipe_path="fields.yaml", overrides=[])
    surgery.tune._finish(plan, recipe.tune, recipe, tmp_path / "search", out=None, echo=lambda *a: None)
    assert exported == ([run_dir] if export_best else [])


# --------------------------------------------------------------------------- serve


def test_serve_settings_reach_the_replicas_and_the_deployment() -> None:
    from serve.config import AppArgs, deployment_options, model_settings
    from surgery.schema import Serve

    section = Serve(
        max_batch_size=7,
        batch_wait_ms=9.0,
        replicas=3,
        max_ongoing_requests=50,
        max_body_mb=1.5,
        request_timeout_s=12.0,
        top_k=2,
    )
    args = AppArgs(bundles=["b"])
    settings = model_settings(args, section)
    assert settings["max_batch_size"] == 7 and settings["batch_wait_timeout_s"] == pytest.approx(0.009)
    assert (settings["max_body_mb"], settings["request_timeout_s"], settings["top_k"]) == (1.5, 12.0, 2)
    options = deployment_options(args, section, settings)
    assert options["num_replicas"] == 3 and options["max_ongoing_requests"] == 50
    assert options["user_config"] == {"max_batch_size": 7, "batch_wait_timeout_s": pytest.approx(0.009)}
    scaled = section.model_copy(
        update={"autoscaling": {"min_replicas": 2, "max_replicas": 5, "target_ongoing_requests": 4}}
    )
    scaled = Serve.model_validate(scaled.model_dump())
    auto = deployment_options(args, scaled, settings)
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 5, "target_ongoing_requests": 4}


def test_max_length_limits_the_tokens_of_a_text_model(tiny_bert: Path) -> None:
    text = f"""
name: words
backbone: {{source: transformers, name: {tiny_bert}, pretrained: false}}
heads: [{{name: cls, input: tokens, layers: [{{linear: {{out_features: 2}}}}], loss: cross_entropy}}]
"""
    assert build_model(load_recipe_text(text), load_weights=False).input_spec.max_length == 64  # the model's own
    short = build_model(load_recipe_text(text + "input: {max_length: 8}\n"), load_weights=False)
    assert short.input_spec.max_length == 8 and short.example_inputs(2)[0].shape == (2, 8)


def test_description_and_tags_are_what_the_library_lists() -> None:
    from surgery.library import list_recipes
    from surgery.recipe import load_recipe

    quickstart = load_recipe("quickstart")
    row = next(line for line in list_recipes().splitlines() if line.startswith("quickstart "))
    assert row.endswith(quickstart.description) and ",".join(quickstart.tags) in row
    assert "quickstart " not in list_recipes("lora") and "quickstart " in list_recipes(quickstart.tags[0])


# --------------------------------------------------------------------------- the registry

T = "tests/"
LAYER_TESTS = (T + "test_heads.py::test_layer_infers_its_input_size",)
LAYER_SETTINGS = (T + "test_fields.py::test_head_layer_settings_build_what_they_say",)
OPTIMIZER = (T + "test_fields.py::test_optimizer_settings_change_the_steps",)
SCHEDULE = (T + "test_fields.py::test_schedules_follow_their_settings",)
AUGMENT = (T + "test_fields.py::test_each_augmentation_and_its_settings_change_the_training_images",)
LOADER = (T + "test_fields.py::test_loader_settings_reach_the_loaders",)
SERVE = (T + "test_fields.py::test_serve_settings_reach_the_replicas_and_the_deployment",)
SPACE = (
    T + "test_tune.py::test_domains_produce_exactly_the_values_that_were_checked",
    T + "test_tune.py::test_searches_the_schema_refuses",
)
CHECKPOINTS = (T + "test_checkpoint.py::test_checkpoint_layout_index_and_keep_best",)
EARLY_STOPPING = (
    T + "test_train.py::test_early_stopping_stops_after_patience",
    T + "test_train.py::test_patience_counts_epochs_when_evaluating_every_second_epoch",
)
WRITES = (T + "test_fields.py::test_loop_settings_shape_what_a_run_writes",)

# Each leaf field of the schema → the tests that show its effect (or its refusal where it cannot
# act). `surgery.replace.layer.*` is the same `LayerSpec` as `heads.layers.*`, built by the same
# `build_layer`: its entries are those of `heads.layers.*` (see `_entry`).
FIELD_TESTS: dict[str, tuple[str, ...]] = {
    "name": (
        T + "test_export.py::test_manifest_describes_the_model",
        T + "test_build_e2e.py::test_quickstart_builds_offline_to_97_percent",
    ),
    "description": (T + "test_fields.py::test_description_and_tags_are_what_the_library_lists",),
    "tags": (
        T + "test_fields.py::test_description_and_tags_are_what_the_library_lists",
        T + "test_library.py::test_list_show_and_tags",
    ),
    "version": (T + "test_library.py::test_extends_by_name_and_version_from_a_local_library",),
    "extends": (T + "test_recipe.py::test_extends_deep_merges", T + "test_recipe.py::test_extends_chain_and_list"),
    "backbone.source": (
        T + "test_backbones.py::test_timm_taps_and_input_spec_from_pretrained_config",
        T + "test_backbones.py::test_torchvision_pooled_and_logits_from_one_forward",
        T + "test_backbones.py::test_transformers_local_folder_loads_its_weights",
    ),
    "backbone.name": (
        T + "test_backbones.py::test_unknown_timm_name_suggests_close_names",
        T + "test_backbones.py::test_minilm_package_folder_gives_a_real_embedding",
    ),
    "backbone.pretrained": (
        T + "test_backbones.py::test_pretrained_is_the_default_and_a_local_folder_is_loaded",
        T + "test_backbones.py::test_transformers_without_weights_is_config_only",
    ),
    "backbone.weights": (T + "test_backbones.py::test_local_safetensors_round_trip_with_sha256_pin",),
    "backbone.sha256": (
        T + "test_backbones.py::test_tampered_weights_fail_the_pin",
        T + "test_recipe.py::test_a_field_the_recipe_would_ignore_is_refused_at_its_line",
    ),
    "backbone.strict": (T + "test_backbones.py::test_key_mismatches_are_named",),
    "backbone.kwargs": (
        T + "test_backbones.py::test_timm_kwargs_pass_through_and_checked",
        T + "test_backbones.py::test_transformers_kwargs_override_the_config_and_unknown_ones_are_refused",
    ),
    "backbone.revision": (
        T + "test_fields.py::test_backbone_revision_is_asked_of_the_hub",
        T + "test_recipe.py::test_a_field_the_recipe_would_ignore_is_refused_at_its_line",
    ),
    "input.size": (T + "test_model.py::test_input_overrides_apply_over_the_backbone_config",),
    "input.channels": (T + "test_model.py::test_input_channels_override_follows_the_model",),
    "input.mean": (
        T + "test_model.py::test_input_overrides_apply_over_the_backbone_config",
        T + "test_recipe.py::test_a_field_the_recipe_would_ignore_is_refused_at_its_line",
    ),
    "input.std": (
        T + "test_model.py::test_input_overrides_apply_over_the_backbone_config",
        T + "test_data.py::test_normalisation_values_are_one_for_every_channel_or_one_per_channel",
    ),
    "input.max_length": (
        T + "test_fields.py::test_max_length_limits_the_tokens_of_a_text_model",
        T + "test_recipe.py::test_a_field_the_recipe_would_ignore_is_refused_at_its_line",
    ),
    "surgery.replace.module": (T + "test_ops.py::test_replace_puts_an_allowlisted_layer_sized_for_its_input",),
    "surgery.remove": (T + "test_ops.py::test_remove_puts_identity",),
    "surgery.truncate": (
        T + "test_ops.py::test_truncate_after_a_module_cuts_everything_later",
        T + "test_ops.py::test_truncate_inside_a_stage_keeps_its_ancestors",
    ),
    "surgery.input_channels": (
        T + "test_ops.py::test_input_channels_adapts_the_first_conv_like_timm",
        T + "test_ops.py::test_input_channels_on_torchvision",
    ),
    "surgery.reinit": (T + "test_ops.py::test_reinit_resets_only_that_module",),
    "surgery.lora.targets": (
        T + "test_ops.py::test_lora_adapters_train_alone_and_merge_back",
        T + "test_ops.py::test_lora_target_that_matches_nothing",
    ),
    "surgery.lora.r": (T + "test_fields.py::test_lora_settings_reach_the_adapters",),
    "surgery.lora.alpha": (T + "test_fields.py::test_lora_settings_reach_the_adapters",),
    "surgery.lora.dropout": (T + "test_fields.py::test_lora_settings_reach_the_adapters",),
    "heads.name": (T + "test_model.py::test_parameter_names_are_backbone_and_heads",),
    "heads.input": (
        T + "test_backbones.py::test_torchvision_pooled_and_logits_from_one_forward",
        T + "test_backbones.py::test_transformers_token_pooling",
    ),
    "heads.pool": (T + "test_backbones.py::test_transformers_token_pooling",),
    "heads.feature_index": (
        T + "test_backbones.py::test_timm_taps_and_input_spec_from_pretrained_config",
        T + "test_model.py::test_features_index_out_of_range",
    ),
    "heads.layers.linear.out_features": LAYER_TESTS,
    "heads.layers.linear.bias": LAYER_SETTINGS,
    "heads.layers.mlp.hidden": (*LAYER_TESTS, *LAYER_SETTINGS),
    "heads.layers.mlp.out_features": LAYER_TESTS,
    "heads.layers.mlp.activation": LAYER_SETTINGS,
    "heads.layers.mlp.norm": LAYER_SETTINGS,
    "heads.layers.mlp.dropout": LAYER_SETTINGS,
    "heads.layers.dropout.p": LAYER_SETTINGS,
    "heads.layers.layernorm.eps": LAYER_SETTINGS,
    "heads.layers.batchnorm.eps": LAYER_SETTINGS,
    "heads.layers.conv1x1.out_channels": LAYER_TESTS,
    "heads.layers.conv1x1.bias": LAYER_SETTINGS,
    "heads.loss.name": (
        T + "test_heads.py::test_task_follows_the_loss",
        T + "test_heads.py::test_regression_losses_accept_flat_targets",
    ),
    "heads.loss.weight": (T + "test_heads.py::test_compute_losses_weights_and_label_smoothing",),
    "heads.loss.label_smoothing": (T + "test_heads.py::test_compute_losses_weights_and_label_smoothing",),
    "heads.metrics": (
        T + "test_metrics.py::test_tracker_accumulates_batches_and_names_keys",
        T + "test_monitor.py::test_tensorboard_scalars_histograms_images_graph",
    ),
    "heads.labels": (
        T + "test_heads.py::test_labels_must_match_outputs",
        T + "test_export.py::test_manifest_describes_the_model",
    ),
    "heads.target": (T + "test_fields.py::test_label_column_and_head_target_pick_the_columns",),
    "heads.init": (T + "test_heads.py::test_init_options", T + "test_heads.py::test_default_init_keeps_pytorch_init"),
    "freeze": (T + "test_freeze.py::test_freeze_then_unfreeze_last_match_wins",),
    "unfreeze": (T + "test_freeze.py::test_freeze_then_unfreeze_last_match_wins",),
    "placement.strategy": (
        T + "test_placement.py::test_pipeline_recipe_trains_and_checkpoints_plain_names",
        T + "test_placement.py::test_ddp_two_processes_reach_the_single_process_weights",
        T + "test_placement.py::test_data_parallel_is_refused_with_the_reason",
    ),
    "placement.device": (T + "test_placement.py::test_bad_placement_is_one_line_before_any_folder",),
    "placement.workers": (
        T + "test_placement.py::test_ddp_two_processes_reach_the_single_process_weights",
        T + "test_placement.py::test_fields_of_another_strategy_are_errors_not_ignored",
    ),
    "placement.engine": (
        T + "test_placement.py::test_ray_train_two_workers_run_the_quickstart",
        T + "test_placement.py::test_engine_ray_without_ray_train_installed",
    ),
    "placement.max_failures": (
        T + "test_placement.py::test_ray_train_worker_killed_restarts_from_the_last_checkpoint",
        T + "test_placement.py::test_fields_of_another_strategy_are_errors_not_ignored",
    ),
    "placement.stages.modules": (
        T + "test_placement.py::test_plan_shows_each_module_on_its_stage_and_memory_per_stage",
        T + "test_placement.py::test_bad_placement_is_one_line_before_any_folder",
    ),
    "placement.stages.device": (
        T + "test_placement.py::test_plan_shows_each_module_on_its_stage_and_memory_per_stage",
        T + "test_placement.py::test_bad_placement_is_one_line_before_any_folder",
    ),
    "placement.micro_batches": (
        T + "test_placement.py::test_pipeline_micro_batches_give_the_single_device_outputs_loss_and_gradients",
    ),
    "data.source": (
        T + "test_data.py::test_digits_batches_match_serving_preprocessing",
        T + "test_data.py::test_image_folder_with_val_folder_and_labels",
        T + "test_data.py::test_csv_feature_columns_and_string_labels",
        T + "test_data.py::test_synthetic_follows_model_input_and_heads",
    ),
    "data.train": (T + "test_data.py::test_image_folder_with_val_folder_and_labels",),
    "data.val": (T + "test_data.py::test_image_folder_with_val_folder_and_labels",),
    "data.val_split": (T + "test_data.py::test_csv_feature_columns_and_string_labels",),
    "data.split_seed": (T + "test_data.py::test_digits_split_is_seeded_by_split_seed",),
    "data.text_column": (T + "test_data.py::test_csv_text_column_is_tokenised_like_serving",),
    "data.feature_columns": (T + "test_data.py::test_csv_feature_columns_and_string_labels",),
    "data.label_column": (T + "test_fields.py::test_label_column_and_head_target_pick_the_columns",),
    "data.on_bad_file": (
        T + "test_data.py::test_on_bad_file_error_names_the_file_and_the_setting",
        T + "test_data.py::test_on_bad_file_skip_leaves_unreadable_images_out_and_lists_them",
    ),
    "data.batch_size": (T + "test_data.py::test_digits_batches_match_serving_preprocessing",),
    "data.eval_batch_size": LOADER,
    "data.num_workers": LOADER,
    "data.pin_memory": LOADER,
    "data.shuffle": (T + "test_fields.py::test_shuffle_and_drop_last_decide_each_epochs_batches",),
    "data.drop_last": (T + "test_fields.py::test_shuffle_and_drop_last_decide_each_epochs_batches",),
    "data.augment.hflip.p": (*AUGMENT, T + "test_fields.py::test_flips_with_p_1_flip_every_image"),
    "data.augment.vflip.p": (*AUGMENT, T + "test_fields.py::test_flips_with_p_1_flip_every_image"),
    "data.augment.random_resized_crop.scale": AUGMENT,
    "data.augment.random_resized_crop.ratio": AUGMENT,
    "data.augment.random_crop.padding": AUGMENT,
    "data.augment.rotate.degrees": (
        *AUGMENT,
        T + "test_data.py::test_augmentations_are_a_function_of_seed_epoch_and_index",
    ),
    "data.augment.color_jitter.brightness": AUGMENT,
    "data.augment.color_jitter.contrast": AUGMENT,
    "data.augment.color_jitter.saturation": AUGMENT,
    "data.augment.gaussian_noise.std": AUGMENT,
    "data.synthetic.num_samples": (T + "test_data.py::test_synthetic_follows_model_input_and_heads",),
    "data.synthetic.num_classes": (T + "test_data.py::test_synthetic_follows_model_input_and_heads",),
    "data.limit_train": LOADER,
    "data.limit_val": LOADER,
    "data.image_column": (T + "test_data_tables.py::test_kaggle_csv_of_image_paths_with_bom_and_counts",),
    "data.image_root": (
        T + "test_data_tables.py::test_image_paths_leaving_the_root_are_refused_and_symlinks_followed",
    ),
    "data.delimiter": (T + "test_data_tables.py::test_wrong_delimiter_is_named",),
    "data.label_separator": (T + "test_data_tables.py::test_multilabel_from_json_lists_and_a_separator",),
    "data.on_bad_row": (
        T + "test_data_tables.py::test_missing_cell_is_an_error_with_file_row_column_or_skipped_and_counted",
    ),
    "data.max_row_bytes": (
        T + "test_data_tables.py::test_a_line_longer_than_the_limit_is_a_bad_row_without_reading_it_whole",
    ),
    "data.hf.name": (
        T + "test_data_tables.py::test_hf_hub_id_offline_without_cache_is_one_line",
        T + "test_data_tables.py::test_hf_hub_config_and_revision_reach_load_dataset_and_need_a_hub_id",
    ),
    "data.hf.config": (
        T + "test_data_tables.py::test_hf_hub_config_and_revision_reach_load_dataset_and_need_a_hub_id",
    ),
    "data.hf.revision": (
        T + "test_data_tables.py::test_hf_hub_config_and_revision_reach_load_dataset_and_need_a_hub_id",
    ),
    "data.hf.train_split": (T + "test_data_tables.py::test_hf_splits_are_chosen_by_name",),
    "data.hf.val_split": (
        T + "test_data_tables.py::test_hf_splits_are_chosen_by_name",
        T + "test_data_tables.py::test_hf_save_to_disk_folder_with_images_and_class_labels",
    ),
    "train.epochs": (T + "test_train.py::test_accumulation_and_max_steps_count_optimizer_steps",),
    "train.max_steps": (T + "test_train.py::test_accumulation_and_max_steps_count_optimizer_steps",),
    "train.seed": (
        T + "test_train.py::test_same_seed_same_weights",
        T + "test_model.py::test_builds_are_reproducible_by_seed",
    ),
    "train.optimizer.name": OPTIMIZER,
    "train.optimizer.lr": (
        *OPTIMIZER,
        T + "test_train.py::test_a_learning_rate_that_blows_up_stops_the_run_in_one_line",
    ),
    "train.optimizer.weight_decay": OPTIMIZER,
    "train.optimizer.momentum": OPTIMIZER,
    "train.optimizer.nesterov": (*OPTIMIZER, T + "test_fields.py::test_nesterov_without_momentum_sgd_is_refused"),
    "train.optimizer.betas": OPTIMIZER,
    "train.optimizer.eps": OPTIMIZER,
    "train.scheduler.name": SCHEDULE,
    "train.scheduler.warmup_steps": SCHEDULE,
    "train.scheduler.min_lr": SCHEDULE,
    "train.scheduler.step_epochs": SCHEDULE,
    "train.scheduler.gamma": SCHEDULE,
    "train.precision": (
        T + "test_train.py::test_bf16_autocast_on_cpu_trains",
        T + "test_build.py::test_settings_fit_refuses_are_refused_before_any_run_folder",
    ),
    "train.accumulate": (T + "test_train.py::test_accumulation_and_max_steps_count_optimizer_steps",),
    "train.clip_grad_norm": (T + "test_fields.py::test_clip_grad_norm_clips_the_step_to_its_norm",),
    "train.lr_groups.params": (T + "test_freeze.py::test_param_groups_cover_every_parameter_once_with_scales",),
    "train.lr_groups.lr_scale": (
        T + "test_freeze.py::test_param_groups_cover_every_parameter_once_with_scales",
        T + "test_monitor.py::test_tensorboard_scalars_histograms_images_graph",
    ),
    "train.unfreeze_at.epoch": (T + "test_train.py::test_frozen_backbone_then_unfreeze_at_epoch_1",),
    "train.unfreeze_at.params": (T + "test_train.py::test_frozen_backbone_then_unfreeze_at_epoch_1",),
    "train.unfreeze_at.lr_scale": (T + "test_freeze.py::test_param_groups_cover_every_parameter_once_with_scales",),
    "train.frozen_batchnorm": (T + "test_freeze.py::test_frozen_batchnorm_train_lets_stats_move",),
    "train.checkpoint.every_steps": (T + "test_train.py::test_unevaluated_checkpoints_are_resumable_but_never_ranked",),
    "train.checkpoint.every_epoch": WRITES,
    "train.checkpoint.keep_best": (
        *CHECKPOINTS,
        T + "test_train.py::test_unevaluated_checkpoints_are_resumable_but_never_ranked",
    ),
    "train.checkpoint.monitor": (T + "test_checkpoint.py::test_a_save_clears_what_killed_saves_left",),
    "train.checkpoint.mode": (T + "test_checkpoint.py::test_a_save_clears_what_killed_saves_left",),
    "train.early_stopping.monitor": EARLY_STOPPING,
    "train.early_stopping.mode": (T + "test_fields.py::test_early_stopping_mode_max_wants_the_metric_to_rise",),
    "train.early_stopping.patience": EARLY_STOPPING,
    "train.early_stopping.min_delta": EARLY_STOPPING,
    "train.eval_every_epochs": (
        *WRITES,
        T + "test_train.py::test_patience_counts_epochs_when_evaluating_every_second_epoch",
    ),
    "train.cache_features": (
        T + "test_features.py::test_cached_run_matches_uncached_and_is_reused_on_resume",
        T + "test_features.py::test_dropout_in_the_head_is_fine_but_on_refuses_an_unsafe_recipe",
    ),
    "monitor.tensorboard": WRITES,
    "monitor.log_every_steps": (*WRITES, T + "test_monitor.py::test_tensorboard_scalars_histograms_images_graph"),
    "monitor.histograms": (*WRITES, T + "test_monitor.py::test_tensorboard_scalars_histograms_images_graph"),
    "monitor.graph": (*WRITES, T + "test_monitor.py::test_tensorboard_scalars_histograms_images_graph"),
    "monitor.sample_predictions": (*WRITES, T + "test_monitor.py::test_tensorboard_scalars_histograms_images_graph"),
    "monitor.progress": (T + "test_monitor.py::test_plain_progress_lines_and_summary",),
    "monitor.wandb.project": (T + "test_monitor.py::test_wandb_offline_writes_its_run_files",),
    "monitor.wandb.mode": (T + "test_monitor.py::test_wandb_offline_writes_its_run_files",),
    "tune.search": (
        T + "test_tune.py::test_model_based_searches",
        T + "test_tune.py::test_grid_search_ends_in_a_tuned_recipe_that_rebuilds_the_best_trial",
    ),
    "tune.space.grid": SPACE,
    "tune.space.choice": SPACE,
    "tune.space.uniform": SPACE,
    "tune.space.loguniform": SPACE,
    "tune.space.randint": SPACE,
    "tune.space.quniform": SPACE,
    "tune.metric": (T + "test_tune.py::test_grid_search_ends_in_a_tuned_recipe_that_rebuilds_the_best_trial",),
    "tune.mode": (T + "test_tune.py::test_grid_search_ends_in_a_tuned_recipe_that_rebuilds_the_best_trial",),
    "tune.num_samples": (T + "test_tune.py::test_grid_search_ends_in_a_tuned_recipe_that_rebuilds_the_best_trial",),
    "tune.max_concurrent": (T + "test_tune.py::test_concurrency_follows_the_resources",),
    "tune.scheduler": (T + "test_tune.py::test_asha_stops_poor_trials_early",),
    "tune.grace_period": (T + "test_fields.py::test_asha_settings_reach_the_scheduler",),
    "tune.reduction_factor": (T + "test_fields.py::test_asha_settings_reach_the_scheduler",),
    "tune.time_budget_s": (T + "test_fields.py::test_time_budget_reaches_the_search",),
    "tune.resources.cpus": (T + "test_tune.py::test_concurrency_follows_the_resources",),
    "tune.resources.gpus": (T + "test_tune.py::test_concurrency_follows_the_resources",),
    "tune.seed": (T + "test_fields.py::test_the_search_seed_decides_the_points_tried",),
    "tune.export_best": (T + "test_fields.py::test_export_best_exports_the_best_trials_bundle_or_not",),
    "export.formats": (T + "test_export.py::test_every_format_is_written_and_verified",),
    "export.opset": (
        T + "test_export.py::test_the_requested_opset_is_written_and_the_manifest_reads_it_from_the_file",
        T + "test_export.py::test_an_opset_the_exporter_cannot_write_is_refused_when_validating",
    ),
    "export.tolerance": (T + "test_export.py::test_outputs_beyond_tolerance_fail_the_format",),
    "export.dynamic_batch": (
        T + "test_export.py::test_a_fixed_batch_export_is_captured_checked_and_recorded_at_its_batch",
    ),
    "export.batch_size": (
        T + "test_export.py::test_a_fixed_batch_export_is_captured_checked_and_recorded_at_its_batch",
        T + "test_export.py::test_a_batch_size_for_a_dynamic_batch_is_refused",
    ),
    "serve.max_batch_size": (*SERVE, T + "test_serve.py::test_concurrent_requests_form_batches"),
    "serve.batch_wait_ms": SERVE,
    "serve.replicas": (*SERVE, T + "test_serve.py::test_config_out_is_a_valid_serve_config"),
    "serve.autoscaling.min_replicas": (
        *SERVE,
        T + "test_recipe.py::test_a_field_the_recipe_would_ignore_is_refused_at_its_line",
    ),
    "serve.autoscaling.max_replicas": (*SERVE, T + "test_serve.py::test_config_out_takes_autoscaling_from_the_recipe"),
    "serve.autoscaling.target_ongoing_requests": (
        *SERVE,
        T + "test_serve.py::test_config_out_takes_autoscaling_from_the_recipe",
    ),
    "serve.max_ongoing_requests": SERVE,
    "serve.max_body_mb": SERVE,
    "serve.request_timeout_s": SERVE,
    "export.quantize": (
        T + "test_quantize.py::test_a_failing_gate_keeps_the_model_marked_failed_and_no_runtime_uses_it",
        T + "test_quantize.py::test_the_recipe_refuses_quantize_without_onnx",
    ),
    "export.quantize_max_drop": (
        T + "test_quantize.py::test_a_failing_gate_keeps_the_model_marked_failed_and_no_runtime_uses_it",
        T + "test_quantize.py::test_cli_quantize_writes_int8_with_parity_per_head",
    ),
    "export.calibration_samples": (T + "test_quantize.py::test_cli_quantize_writes_int8_with_parity_per_head",),
    "serve.runtime": (
        T + "test_runtimes.py::test_named_runtime_is_opened_without_timing",
        T + "test_serve_runtime.py::test_each_app_says_which_runtime_runs_and_why",
        T + "test_serve_runtime.py::test_a_runtime_the_bundle_cannot_run_is_refused_before_deploying",
    ),
    "serve.top_k": (*SERVE, T + "test_serve_decode.py::test_v1_rows_rank_labels_by_probability"),
}

ALIASES = {"surgery.replace.layer.": "heads.layers."}  # one model, one builder: one set of tests


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def leaf_fields(model: type[BaseModel] = Recipe, prefix: str = "") -> list[str]:
    """Every field path of the schema that holds a value rather than another model (list items and
    dict values are walked through: `heads.loss.name`, `tune.space.grid`)."""
    leaves: list[str] = []
    for name, field in model.model_fields.items():
        models = _models_in(field.annotation)
        if not models:
            leaves.append(prefix + name)
        for inner in models:
            leaves.extend(leaf_fields(inner, f"{prefix}{name}."))
    return leaves


def _entry(field: str) -> tuple[str, ...] | None:
    for alias, target in ALIASES.items():
        if field.startswith(alias):
            entry = FIELD_TESTS.get(target + field[len(alias) :])
            return (
                (*entry, T + "test_ops.py::test_replace_puts_an_allowlisted_layer_sized_for_its_input")
                if entry
                else None
            )
    return FIELD_TESTS.get(field)


def _test_functions() -> set[str]:
    """`tests/<file>::<test>` of every test function (read from the source: nothing is imported)."""
    found = set()
    for path in TESTS.glob("test_*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_"):
                found.add(f"{T}{path.name}::{node.name}")
    return found


def test_every_field_has_a_test_of_its_effect() -> None:
    missing = [field for field in leaf_fields() if not _entry(field)]
    assert not missing, (
        f"recipe field(s) with no test of their effect: {', '.join(missing)}. Write a test that shows each changes "
        "what surgery does (or is refused where it cannot act) and list it in tests/test_fields.py FIELD_TESTS"
    )


def test_every_entry_names_a_field_and_tests_that_exist() -> None:
    fields = set(leaf_fields())
    assert sorted(set(FIELD_TESTS) - fields) == [], "FIELD_TESTS names fields the schema no longer has"
    tests = _test_functions()
    unknown = sorted({test for entry in FIELD_TESTS.values() for test in entry} - tests)
    assert unknown == [], f"FIELD_TESTS names tests that do not exist: {unknown}"
