"""`surgery plan`: build a recipe's model without weights and show what it is before training.

One measured forward (train mode, batch of 1 — 2 if BatchNorm needs it — gradients on, for the recipe's input spec) gives
everything: each module's output shape (forward hooks), FLOPs per sample
(`torch.utils.flop_counter.FlopCounterMode`) and activation memory — the bytes of the tensors
autograd saves for the backward pass (`torch.autograd.graph.saved_tensors_hooks`, counted once
per storage). Frozen parts save almost nothing, which is the point of freezing; the measurement
shows it. Activations are scaled linearly from the measured batch to the recipe's batch size.
Parameters are counted from the built module, so the totals are the module's own.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from surgery.placement import planned_devices
from surgery.schema import Recipe

MEASURE_BATCHES = (1, 2)  # batch 2 when batch 1 can't train (BatchNorm over a single value)
# Optimizer state per trainable parameter, in parameter-sized slots.
_STATE_SLOTS = {"adam": 2, "adamw": 2, "sgd": 1, "rmsprop": 1}


@dataclass
class Row:
    name: str
    type: str
    depth: int
    output_shape: list[int] | None
    params: int
    trainable: int
    devices: list[str]


@dataclass
class Measurement:
    shapes: dict[str, list[int]] = field(default_factory=dict)
    activation_bytes: dict[str, int] = field(default_factory=dict)  # by innermost module
    flops: int = 0
    taps: dict[str, list[int]] = field(default_factory=dict)  # tap kind → shape
    batch: int = 1


def plan_command(
    recipe_path: str | Path, overrides: Sequence[str], *, depth: int, as_json: bool, data: bool = False
) -> str:
    """Load and build a recipe (no weights), and describe it as a table or JSON; with `data`, also
    read its data as `build` would and report samples per split and per class."""
    from surgery.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    plan = make_plan(recipe, depth=depth)
    if data:
        from surgery.data_split import check_data
        from surgery.model import build_model

        plan["data"] = check_data(recipe, build_model(recipe, load_weights=False)).splitlines()
    if as_json:
        return json.dumps(plan, indent=2)
    return render_plan(plan) + ("\n" + "\n".join(plan["data"]) if data else "")


def make_plan(recipe: Recipe, *, depth: int = 3) -> dict[str, Any]:
    """The plan as plain data (what `--json` prints)."""
    from surgery.backbone_weights import weights_origin
    from surgery.model import build_model, check_fits_in_memory

    check_fits_in_memory(recipe)  # before allocating anything
    model = build_model(recipe, load_weights=False)
    placement = planned_devices(model, recipe)
    measured = measure(model)
    rows = module_rows(model, measured, placement, depth)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "recipe": recipe.name,
        "weights": weights_origin(recipe.backbone),
        "input": model.input_spec.to_dict(),
        "heads": {name: info.to_dict() for name, info in model.head_info.items()},
        "taps": measured.taps,
        "modules": [row.__dict__ for row in rows],
        "totals": {"params": total, "trainable": trainable, "frozen": total - trainable},
        "flops_per_sample": measured.flops // measured.batch,
        "memory": memory_estimate(model, recipe, measured, placement),
    }


# --------------------------------------------------------------------------- placement


def _module_devices(prefix: str, placement: dict[str, str]) -> list[str]:
    """Where a module runs: its own entry (a module without weights), or where its parameters are."""
    start = prefix + "."
    return sorted({d for n, d in placement.items() if n == prefix or n.startswith(start)})


# --------------------------------------------------------------------------- measurement


@contextmanager
def _shape_hooks(model: nn.Module, measured: Measurement) -> Iterator[list[str]]:
    stack: list[str] = []
    handles = []

    def pre(name: str) -> Any:
        return lambda m, args: stack.append(name)

    def post(name: str) -> Any:
        def hook(m: nn.Module, args: Any, out: Any) -> None:
            stack.pop()
            if name not in measured.shapes and isinstance(out, Tensor):
                measured.shapes[name] = list(out.shape)

        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(pre(name)))
            handles.append(module.register_forward_hook(post(name)))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def measure(model: nn.Module) -> Measurement:
    """One training-mode forward: output shapes, FLOPs and saved-activation bytes."""
    for batch in MEASURE_BATCHES:
        try:
            return _measure(model, batch)
        except ValueError:  # "Expected more than 1 value per channel when training"
            if batch == MEASURE_BATCHES[-1]:
                raise
    raise AssertionError("unreachable")


def _measure(model: nn.Module, batch: int) -> Measurement:
    from torch.utils.flop_counter import FlopCounterMode

    measured = Measurement(batch=batch)
    seen: set[tuple[int, int]] = set()
    weights = _parameter_storages(model)
    inputs = model.example_inputs(batch)
    model.train()
    with _shape_hooks(model, measured) as stack:

        def pack(t: Tensor) -> Tensor:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key[0] not in weights and key not in seen:  # weights are counted as weights
                seen.add(key)
                where = stack[-1] if stack else ""
                measured.activation_bytes[where] = measured.activation_bytes.get(where, 0) + key[1]
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), FlopCounterMode(display=False) as counter:
            _, taps = model.forward_with_taps(*inputs)
        measured.flops = int(counter.get_total_flops())
    model.eval()
    measured.taps = tap_shapes(taps)
    return measured


def tap_shapes(taps: dict[str, Any]) -> dict[str, list[int]]:
    """Shapes of what the backbone gives the heads (`tokens` before pooling, each feature map)."""
    shapes: dict[str, Any] = {}
    for kind, value in taps.items():
        if kind == "tokens":
            shapes[kind] = list(value[0].shape)
        elif kind == "features":
            shapes[kind] = [list(f.shape) for f in value]
        else:
            shapes[kind] = list(value.shape)
    return shapes


def _parameter_storages(model: nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


# --------------------------------------------------------------------------- rows & memory


def module_rows(model: nn.Module, measured: Measurement, placement: dict[str, str], depth: int) -> list[Row]:
    """One row per module down to `depth` (1: `backbone` and `heads`)."""
    params = dict(model.named_parameters())
    rows = []
    for name, module in model.named_modules():
        level = name.count(".") + 1 if name else 0
        if not name or level > depth:
            continue
        mine = [p for n, p in params.items() if n.startswith(name + ".")]
        rows.append(
            Row(
                name=name,
                type=type(module).__name__,
                depth=level,
                output_shape=measured.shapes.get(name),
                params=sum(p.numel() for p in mine),
                trainable=sum(p.numel() for p in mine if p.requires_grad),
                devices=_module_devices(name, placement),
            )
        )
    return rows


def _bytes_per_param(model: nn.Module) -> dict[str, int]:
    return {n: p.numel() * p.element_size() for n, p in model.named_parameters()}


def _activation_devices(model: nn.Module, measured: Measurement, placement: dict[str, str]) -> dict[str, int]:
    fallback = next(iter(placement.values()), "cpu")
    result: dict[str, int] = {}
    for module_name, nbytes in measured.activation_bytes.items():
        device = fallback
        prefix = module_name
        while prefix:
            devices = _module_devices(prefix, placement)
            if devices:
                device = devices[0]
                break
            prefix = prefix.rpartition(".")[0]
        result[device] = result.get(device, 0) + nbytes
    return result


def memory_estimate(
    model: nn.Module, recipe: Recipe, measured: Measurement, placement: dict[str, str]
) -> dict[str, Any]:
    """Training memory per device: weights, gradients (trainable only), optimizer state (by the
    optimizer's per-parameter slots) and activations (measured, scaled to the batch size)."""
    batch = recipe.data.batch_size if recipe.data else 32
    optimizer = recipe.train.optimizer
    slots = _STATE_SLOTS[optimizer.name]
    if optimizer.name == "sgd" and optimizer.momentum == 0:
        slots = 0
    half = recipe.train.precision in ("bf16", "fp16")
    sizes = _bytes_per_param(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    devices: dict[str, dict[str, int]] = {}
    for name, nbytes in sizes.items():
        entry = devices.setdefault(
            placement[name], dict.fromkeys(("weights", "gradients", "optimizer_state", "activations"), 0)
        )
        entry["weights"] += nbytes
        if name in trainable:
            entry["gradients"] += nbytes
            entry["optimizer_state"] += nbytes * slots
    for device, nbytes in _activation_devices(model, measured, placement).items():
        entry = devices.setdefault(device, dict.fromkeys(("weights", "gradients", "optimizer_state", "activations"), 0))
        scaled = nbytes * batch // measured.batch
        entry["activations"] += scaled // 2 if half else scaled
    for entry in devices.values():
        entry["total"] = sum(entry.values())
    return {
        "batch_size": batch,
        "optimizer": optimizer.name,
        "precision": recipe.train.precision,
        "activations": f"measured: tensors saved for backward in one forward of batch {measured.batch}, scaled to {batch}"
        + (" and halved for autocast" if half else ""),
        "per_device": devices,
    }


def planned_bytes(model: nn.Module, recipe: Recipe, device: torch.device) -> int | None:
    """`surgery plan`'s training-memory estimate for this model, recipe and device, which `fit`
    logs next to the memory it measures (one measured forward of batch 1 on the unplaced model;
    RNG and buffers left as they were)."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    training = model.training
    try:
        with torch.random.fork_rng(devices=[]):
            measured = measure(model)
        where = dict.fromkeys((n for n, _ in model.named_parameters()), str(device))
        estimate = memory_estimate(model, recipe, measured, where)
    except Exception:  # a model plan can't measure: no estimate to compare with
        return None
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
        model.train(training)
    return int(sum(entry["total"] for entry in estimate["per_device"].values()))


# --------------------------------------------------------------------------- rendering


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return f"{n:.1f}P{unit}"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def render_plan(plan: dict[str, Any]) -> str:
    """The plan as rich tables (plain text when not on a terminal)."""
    from rich.console import Console
    from rich.table import Table

    buffer = io.StringIO()
    console = Console(file=buffer, width=140, force_terminal=False, color_system=None)
    table = Table(title=f"{plan['recipe']}: modules", title_justify="left")
    for column in ("module", "type", "output shape", "params", "trainable", "device"):
        table.add_column(column, justify="right" if column in ("params", "trainable") else "left")
    for row in plan["modules"]:
        shape = _shape_text(row["output_shape"]) if row["output_shape"] else "-"
        if row["name"] == "backbone" and row["output_shape"] is None:
            shape = (
                ", ".join(f"{kind} {_shape_text(s)}" for kind, s in plan["taps"].items() if kind != "features") or "-"
            )
        state = (
            "all"
            if row["trainable"] == row["params"] and row["params"]
            else ("frozen" if row["trainable"] == 0 else f"{row['trainable']:,}")
        )
        table.add_row(
            "  " * (row["depth"] - 1) + row["name"],
            row["type"],
            shape,
            f"{row['params']:,}",
            state,
            ", ".join(row["devices"]) or "-",
        )
    console.print(table)
    console.print(_totals_text(plan))
    console.print(_memory_table(plan, Table))
    return buffer.getvalue().rstrip() + "\n"


def _shape_text(shape: list[int]) -> str:
    return "×".join(str(d) for d in shape[1:])


def _totals_text(plan: dict[str, Any]) -> str:
    totals = plan["totals"]
    spec = plan["input"]
    shape = (
        f"{spec['channels']}×{spec['size'][0]}×{spec['size'][1]}"
        if spec["kind"] == "image"
        else f"{spec['max_length']} tokens"
    )
    return (
        f"backbone weights: {plan['weights']}{' (plan does not load them)' if plan['weights'].startswith('pretrained') else ''}\n"
        f"parameters: {totals['params']:,} total, {totals['trainable']:,} trainable, {totals['frozen']:,} frozen\n"
        f"input: {spec['kind']} {shape}; forward FLOPs per sample: {_human(plan['flops_per_sample'])} (2 per multiply-add)\n"
        f"heads: "
        + ", ".join(f"{name} ({info['task']}, {info['out_features']} out)" for name, info in plan["heads"].items())
    )


def _memory_table(plan: dict[str, Any], table_cls: Any) -> Any:
    memory = plan["memory"]
    table = table_cls(
        title=f"training memory estimate (batch {memory['batch_size']}, {memory['optimizer']}, {memory['precision']})",
        title_justify="left",
        caption=f"activations {memory['activations']}",
        caption_justify="left",
    )
    for column in ("device", "weights", "gradients", "optimizer state", "activations", "total"):
        table.add_column(column, justify="left" if column == "device" else "right")
    for device, entry in memory["per_device"].items():
        table.add_row(
            device, *(_mib(entry[k]) for k in ("weights", "gradients", "optimizer_state", "activations", "total"))
        )
    return table
