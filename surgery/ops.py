"""Module surgery: ordered operations on named modules of the backbone.

Module names are the backbone's own dotted names (`layer4.1.conv2`, `classifier.6`), as
`surgery plan` prints them without the `backbone.` prefix.

- `replace`: put an allowlisted layer (sized for what feeds the module) in the module's place.
- `remove`: put `Identity` in its place.
- `truncate`: every module that the forward runs *after* the named one finishes (other than its
  ancestors) becomes `Identity`, so the backbone's output is that module's output. Plain tensor
  code between modules in the zoo's forward (a `flatten`, a `mean`) still runs; what we can cut
  is modules, so a head usually starts with `avgpool` or `flatten` after a truncate.
- `input_channels: N`: the first convolution gets N input channels, its pretrained weights
  adapted with timm's `adapt_input_conv` (summed for 1 channel, repeated and rescaled for more).
- `reinit`: the module's parameters and buffers get the model's own initialisation: timm and
  torchvision backbones are constructed once more without weights and the module's tensors are
  copied from that fresh copy (so timm's zero-initialised last BatchNorm of each residual block,
  its truncated-normal ViT weights, torchvision's per-model init... are what a reinit gives, as
  they are what training from scratch starts from). Tensors the fresh copy lacks (a module
  another op changed, LoRA adapters) and transformers backbones fall back to PyTorch's
  `reset_parameters()`.
- `lora`: LoRA adapters on the Linear/Conv layers whose names match the globs, via `peft`
  (`inject_adapter_in_model`, no `PeftModel` wrapper, so parameter names stay `backbone.*`). We
  use peft rather than our own layers because it is the reference implementation: its merge math
  (`merge()`), dropout and scaling are what users compare against, and `merge_lora` folds the
  adapters back into plain layers for export.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from surgery.backbone_contract import BuiltBackbone, set_submodule
from surgery.errors import BuildError
from surgery.freeze import match_params
from surgery.heads import build_layer
from surgery.registry import did_you_mean
from surgery.schema import LoraOp, ReplaceOp, SurgeryOp

RunBackbone = Callable[[], Any]


def apply_surgery(built: BuiltBackbone, ops: list[SurgeryOp], run: RunBackbone) -> None:
    """Apply `ops` in order to `built.module`; `run()` does one forward with example inputs."""
    for i, op in enumerate(ops):
        try:
            _OPS[op.kind](built, op.params, run)
        except BuildError as exc:
            raise BuildError(f"surgery[{i}].{op.kind}: {exc}") from None


def find_module(root: nn.Module, name: str) -> nn.Module:
    """The submodule called `name`, or an error listing close matches."""
    names = [n for n, _ in root.named_modules() if n]
    if name not in names:
        raise BuildError(
            f"no module {name!r} in the backbone{did_you_mean(name, names)}; `surgery plan` lists module names"
        )
    return root.get_submodule(name)


def _replace(built: BuiltBackbone, params: ReplaceOp, run: RunBackbone) -> None:
    target = find_module(built.module, params.module)
    shape = _input_shape(target, run, params.module)
    set_submodule(built.module, params.module, build_layer(params.layer, shape))


def _input_shape(module: nn.Module, run: RunBackbone, name: str) -> tuple[int, ...]:
    seen: list[tuple[int, ...]] = []
    handle = module.register_forward_pre_hook(
        lambda m, args: seen.append(tuple(args[0].shape)) if args and isinstance(args[0], Tensor) else None
    )
    try:
        run()
    finally:
        handle.remove()
    if not seen:
        raise BuildError(
            f"module {name!r} is not called with a tensor in the backbone's forward, so it cannot be replaced by a layer"
        )
    return seen[0]


def _remove(built: BuiltBackbone, name: str, run: RunBackbone) -> None:
    find_module(built.module, name)
    set_submodule(built.module, name, nn.Identity())


def _truncate(built: BuiltBackbone, name: str, run: RunBackbone) -> None:
    find_module(built.module, name)
    for later in modules_after(built.module, name, run):
        set_submodule(built.module, later, nn.Identity())


def modules_after(root: nn.Module, name: str, run: RunBackbone) -> list[str]:
    """The outermost modules whose forward starts after `name`'s forward has finished."""
    events: list[tuple[str, str]] = []
    handles = []
    for mod_name, module in root.named_modules():
        if mod_name:
            handles.append(module.register_forward_pre_hook(lambda m, a, n=mod_name: events.append(("start", n))))
            handles.append(module.register_forward_hook(lambda m, a, o, n=mod_name: events.append(("end", n))))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    ends = [i for i, e in enumerate(events) if e == ("end", name)]
    if not ends:
        raise BuildError(f"module {name!r} is not run by the backbone's forward")
    later = {n for kind, n in events[ends[0] :] if kind == "start"}
    later -= {a for a in later if name.startswith(a + ".")}
    return sorted(n for n in later if not any(n.startswith(p + ".") for p in later))


def _input_channels(built: BuiltBackbone, channels: int, run: RunBackbone) -> None:
    from timm.models import adapt_input_conv

    name, conv = first_conv(built.module)
    if conv.groups != 1:
        raise BuildError(f"the first convolution {name!r} is grouped; its input channels cannot be adapted")
    new = copy.deepcopy(conv)
    new.in_channels = channels
    with torch.no_grad():
        new.weight = nn.Parameter(adapt_input_conv(channels, conv.weight.detach().clone()))
    set_submodule(built.module, name, new)
    spec = built.input_spec
    spec.mean, spec.std = adapt_stats(spec.mean, channels), adapt_stats(spec.std, channels)
    spec.channels = channels


def first_conv(root: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, module in root.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise BuildError("the backbone has no Conv2d, so `input_channels` has nothing to adapt")


def adapt_stats(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    """Per-channel mean/std for `channels` inputs: the average for one channel, else repeated."""
    if not values or len(values) == channels:
        return tuple(values)
    if channels == 1:
        return (sum(values) / len(values),)
    return tuple(values[i % len(values)] for i in range(channels))


def _reinit(built: BuiltBackbone, name: str, run: RunBackbone) -> None:
    target = find_module(built.module, name)
    if not any(True for _ in target.parameters()):
        raise BuildError(f"module {name!r} has no parameters to re-initialise")
    initialised = _copy_own_init(built, name, target)
    for prefix, module in target.named_modules():
        own = [f"{prefix}.{p}" if prefix else p for p, _ in module.named_parameters(recurse=False)]
        if own and not set(own) <= initialised and hasattr(module, "reset_parameters"):
            module.reset_parameters()


def _copy_own_init(built: BuiltBackbone, name: str, target: nn.Module) -> set[str]:
    """Copy the model's own initialisation of `name` from a freshly constructed copy of the
    backbone; the state-dict keys (relative to `target`) it covered."""
    if built.fresh is None:
        return set()
    try:
        fresh = built.fresh().get_submodule(name)
    except (AttributeError, BuildError):  # the module exists only after surgery
        return set()
    source = fresh.state_dict()
    copied = set()
    with torch.no_grad():
        for key, tensor in target.state_dict(keep_vars=True).items():
            init = source.get(key)
            if init is not None and init.shape == tensor.shape and init.dtype == tensor.dtype:
                tensor.copy_(init)
                copied.add(key)
    return copied


_LORA_TYPES = (nn.Linear, nn.Conv2d, nn.Conv1d)


def _lora(built: BuiltBackbone, params: LoraOp, run: RunBackbone) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    candidates = [n for n, m in built.module.named_modules() if n and isinstance(m, _LORA_TYPES)]
    targets: list[str] = []
    for glob in params.targets:
        matched = match_params(glob, candidates)
        if not matched:
            raise BuildError(f"lora target {glob!r} matches no Linear/Conv module{did_you_mean(glob, candidates)}")
        targets.extend(m for m in matched if m not in targets)
    pattern = "^(" + "|".join(_escape(t) for t in targets) + ")$"
    config = LoraConfig(r=params.r, lora_alpha=params.alpha, lora_dropout=params.dropout, target_modules=pattern)
    inject_adapter_in_model(config, built.module)


def _escape(name: str) -> str:
    import re

    return re.escape(name)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer and put the plain layer back (in place; returns
    `model`). Parameter names become the backbone's original ones, as without the `lora` op."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    lora_layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in lora_layers:
        layer.merge()
        set_submodule(model, name, layer.get_base_layer())
    return model


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


_OPS: dict[str, Callable[[BuiltBackbone, Any, RunBackbone], None]] = {
    "replace": _replace,
    "remove": _remove,
    "truncate": _truncate,
    "input_channels": _input_channels,
    "reinit": _reinit,
    "lora": _lora,
}
