"""`build_model`: a validated recipe → `SurgicalModel` (backbone + surgery + heads + freeze rules).

Build order: backbone (with weights) → input spec (backbone's config, then the recipe's `input:`)
→ surgery ops in order → heads sized by a dry forward of example inputs → freeze rules. All
random initialisation happens under `train.seed`, so two builds of a recipe are identical.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from surgery.backbone_contract import BuiltBackbone, Taps, build_backbone
from surgery.backbone_transformers import pool_tokens
from surgery.errors import BuildError
from surgery.freeze import apply_freeze_rules, check_unfreeze_schedule, set_frozen_batchnorm_eval
from surgery.heads import HeadInfo, build_head, head_info, output_shape
from surgery.inputs import InputSpec
from surgery.ops import adapt_stats, apply_surgery
from surgery.schema import Head, Recipe


class SurgicalModel(nn.Module):
    """A backbone and named heads. `forward(*inputs)` takes the inputs named by
    `input_spec.input_names` and returns `{head name: output}`."""

    def __init__(self, built: BuiltBackbone, heads: dict[str, nn.Module], recipe: Recipe) -> None:
        super().__init__()
        self.backbone = built.module
        self.heads = nn.ModuleDict(heads)
        self.input_spec: InputSpec = built.input_spec
        self.tokenizer: Any = built.tokenizer
        self.head_info: dict[str, HeadInfo] = {}
        self._taps: Taps = built.taps
        self._reads: dict[str, tuple[str, str, int]] = {
            h.name: (h.input, h.pool, h.feature_index) for h in recipe.heads
        }
        self._wanted = {h.input for h in recipe.heads}
        self.frozen_batchnorm = recipe.train.frozen_batchnorm

    def taps(self, *inputs: Tensor) -> dict[str, Any]:
        """What the backbone gives the heads, by tap kind."""
        return self._taps(self.backbone, inputs, self._wanted)

    def forward(self, *inputs: Tensor, head_inputs: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """`{head: output}` for `inputs`; or, given `head_inputs` (what each head reads, as
        `read_taps` returns it: cached frozen features), the heads alone."""
        if head_inputs is None:
            return self.forward_with_taps(*inputs)[0]
        return {name: head(head_inputs[name]) for name, head in self.heads.items()}

    def forward_with_taps(self, *inputs: Tensor) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """`forward`'s outputs and the taps they were computed from."""
        taps = self.taps(*inputs)
        return self.forward(head_inputs=self.read_taps(taps)), taps

    def read_taps(self, taps: dict[str, Any]) -> dict[str, Tensor]:
        """Head name → the tensor it reads from `taps` (pooled tokens, the picked feature map)."""
        return {name: select_tap(taps, *self._reads[name]) for name in self.heads}

    def tap_reads(self) -> dict[str, tuple[str, str, int]]:
        """Head name → (tap kind, pool, feature index): what it reads, as a key heads can share."""
        return dict(self._reads)

    def example_inputs(self, batch_size: int = 2, *, seq_len: int | None = None) -> tuple[Tensor, ...]:
        """Valid inputs for `forward` (and export): deterministic values of the right shape and dtype."""
        return example_inputs(self.input_spec, self.tokenizer, batch_size, seq_len=seq_len)

    def train(self, mode: bool = True) -> SurgicalModel:
        super().train(mode)
        if mode and self.frozen_batchnorm == "eval":
            from surgery.freeze import frozen_batchnorms

            for name in frozen_batchnorms(self):
                self.get_submodule(name).eval()
        return self


def select_tap(taps: dict[str, Any], kind: str, pool: str, feature_index: int) -> Tensor:
    """The tensor a head reads: `tokens` pooled by `pool`, `features` picked by index."""
    value = taps[kind]
    if kind == "tokens":
        hidden, mask = value
        return pool_tokens(hidden, mask, pool)
    if kind == "features":
        return value[feature_index]
    return value


def example_inputs(
    spec: InputSpec, tokenizer: Any, batch_size: int, *, seq_len: int | None = None
) -> tuple[Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    if spec.kind == "image":
        return (torch.randn(batch_size, spec.channels, *spec.size, generator=generator),)
    if spec.kind == "vector":
        return (torch.randn(batch_size, spec.features, generator=generator),)
    length = seq_len or spec.max_length
    if tokenizer is not None:
        batch = tokenizer(
            ["a surgical example"] * batch_size,
            padding="max_length",
            truncation=True,
            max_length=length,
            return_tensors="pt",
        )
        return batch["input_ids"].long(), batch["attention_mask"].long()
    return torch.ones(batch_size, length, dtype=torch.long), torch.ones(batch_size, length, dtype=torch.long)


def apply_input_override(spec: InputSpec, recipe: Recipe) -> InputSpec:
    """The recipe's `input:` over what the backbone provides."""
    over = recipe.input
    if over is None:
        return spec
    changes: dict[str, Any] = {}
    if over.size is not None:
        changes["size"] = tuple(over.size)
    if over.channels is not None:
        changes["channels"] = over.channels
        changes["mean"], changes["std"] = adapt_stats(spec.mean, over.channels), adapt_stats(spec.std, over.channels)
    if over.mean is not None:
        changes["mean"] = tuple(over.mean)
    if over.std is not None:
        changes["std"] = tuple(over.std)
    if over.max_length is not None:
        changes["max_length"] = over.max_length
    return dataclasses.replace(spec, **changes)


def _kwargs_channels(built: BuiltBackbone, recipe: Recipe) -> None:
    channels = recipe.backbone.kwargs.get("in_chans")
    if isinstance(channels, int) and channels != built.input_spec.channels:
        spec = built.input_spec
        spec.mean, spec.std, spec.channels = adapt_stats(spec.mean, channels), adapt_stats(spec.std, channels), channels


def build_model(recipe: Recipe, *, load_weights: bool = True) -> SurgicalModel:
    """Build the model a recipe describes. With `load_weights=False` no pretrained weights are read
    or downloaded (for `plan`, and for loading a bundle's own weights afterwards). The commands that
    build from a user's recipe (`build`, `plan`, `tune`) first call `check_fits_in_memory`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.train.seed)
        return _build(recipe, load_weights)


_FORWARD_FAILS = "the backbone fails on"


def parameter_footprint(recipe: Recipe) -> tuple[int, int, str, int] | None:
    """(parameters, their bytes, the module holding the most of them, its parameters), counted on
    the meta device: the model is built as shapes only, so nothing is allocated whatever its size.
    None when the model cannot be built that way (the real build then says why)."""
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = _build(recipe, load_weights=False)
    except BuildError as exc:
        if str(exc).startswith(_FORWARD_FAILS):  # a forward meta tensors can't run: let the real build try
            return None
        raise  # the recipe's own mistake, found without allocating anything
    except Exception:
        return None
    count = sum(p.numel() for p in model.parameters())
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    own = {name: sum(p.numel() for p in module.parameters(recurse=False)) for name, module in model.named_modules()}
    biggest = max(own, key=lambda name: own[name], default="")
    return count, size, biggest, own.get(biggest, 0)


def machine_memory() -> int:
    """Bytes of memory this machine has (the model is built on the CPU first, wherever it trains)."""
    import psutil

    return int(psutil.virtual_memory().total)


def check_fits_in_memory(recipe: Recipe) -> None:
    """Refuse, before allocating, a model whose parameters alone exceed this machine's memory."""
    footprint = parameter_footprint(recipe)
    if footprint is None:
        return
    count, size, biggest, biggest_count = footprint
    memory = machine_memory()
    if size > memory:
        raise BuildError(
            f"the model's parameters alone need {_bytes(size)} ({count:,} parameters), more than this machine's "
            f"{_bytes(memory)} of memory; the largest is {biggest or 'the model'} with {biggest_count:,} parameters"
        )


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _build(recipe: Recipe, load_weights: bool) -> SurgicalModel:
    wanted = {h.input for h in recipe.heads}
    built = build_backbone(recipe.backbone, load_weights=load_weights, wanted=wanted)
    _kwargs_channels(built, recipe)
    built.input_spec = apply_input_override(built.input_spec, recipe)
    run = _dry_runner(built, wanted)
    apply_surgery(built, recipe.surgery, run)
    taps = run()
    heads, infos = {}, {}
    for h in recipe.heads:
        shape = _tap_shape(taps, h)
        heads[h.name] = build_head(h, shape)
        infos[h.name] = head_info(h, output_shape(heads[h.name], shape))
    model = SurgicalModel(built, heads, recipe)
    model.head_info = infos
    apply_freeze_rules(model, recipe)
    check_unfreeze_schedule(model, recipe)
    set_frozen_batchnorm_eval(model, recipe)
    return model


def _dry_runner(built: BuiltBackbone, wanted: set[str]) -> Any:
    """A function doing one no-grad forward of example inputs, for shapes and module order.

    It runs under `FakeTensorMode` (shapes without arithmetic, as `torch.export` does), which makes
    a build cost about what constructing the module costs; a model with an op fake tensors can't
    run falls back to a real forward, decided once so every run of one build sees the same calls."""
    mode: dict[str, bool] = {}

    def forward() -> dict[str, Any]:
        inputs = example_inputs(built.input_spec, built.tokenizer, 1, seq_len=min(built.input_spec.max_length, 16))
        if mode.setdefault("meta", any(p.is_meta for p in built.module.parameters())):
            try:  # shapes only already: meta kernels are much cheaper than fake tensors
                return built.taps(built.module, inputs, wanted)
            except Exception:  # an op meta tensors can't run (data-dependent): fake tensors can
                mode["meta"] = False
        if mode.setdefault("fake", True):
            try:
                return _fake_forward(built, inputs, wanted)
            except Exception:  # any op without a fake kernel: measure for real from now on
                mode["fake"] = False
        return built.taps(built.module, inputs, wanted)

    def run() -> dict[str, Any]:
        was_training = built.module.training
        built.module.eval()
        try:
            with torch.no_grad():
                return forward()
        except (RuntimeError, ValueError, TypeError, IndexError, AssertionError, ArithmeticError) as exc:
            raise BuildError(
                f"{_FORWARD_FAILS} a {built.input_spec.kind} input of the recipe's input spec: {str(exc).splitlines()[0]}"
            ) from None
        finally:
            built.module.train(was_training)

    return run


def _fake_forward(built: BuiltBackbone, inputs: tuple[Tensor, ...], wanted: set[str]) -> dict[str, Any]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        return built.taps(built.module, inputs, wanted)


def _tap_shape(taps: dict[str, Any], head: Head) -> tuple[int, ...]:
    value = (
        select_tap(taps, head.input, head.pool, head.feature_index)
        if head.input != "features"
        else _feature(taps, head)
    )
    return tuple(value.shape)


def _feature(taps: dict[str, Any], head: Head) -> Tensor:
    maps = taps["features"]
    if not -len(maps) <= head.feature_index < len(maps):
        raise BuildError(
            f"heads.{head.name}.feature_index {head.feature_index} is out of range; the backbone gives {len(maps)} feature maps"
        )
    return maps[head.feature_index]
