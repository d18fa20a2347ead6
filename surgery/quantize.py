"""int8 quantization of a bundle's ONNX model, and the parity gate that decides whether any
runtime may use it.

Image and vector models are quantized statically (QDQ: int8 weights per channel, int8
activations with ranges calibrated on a seeded sample of the training data, preprocessed as
training sees it without augmentation). Text models are quantized dynamically (int8 weights,
activations quantized per batch as they run): no calibration, and what holds up for attention.

The float and the int8 graph then both run over the validation split in ONNX Runtime. Per head
the manifest records the monitored metric of each, how much int8 loses (`drop`, in the metric's
units), the share of rows whose top-1 prediction agrees, and the largest output difference. The
gate fails when any head loses more than `export.quantize_max_drop`; a failed int8 model stays in
the bundle for inspection, marked failed, and `surgery.runtimes` refuses it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surgery.bundle import INT8_ONNX, ONNX
from surgery.errors import ExportError

LOWER_IS_BETTER = {"mse", "mae"}
BATCH = 32  # rows per calibration and evaluation batch


def quantize_int8(model: Any, recipe: Any, folder: Path, input_names: Sequence[str]) -> dict[str, Any]:
    """Write `folder/model.int8.onnx` from `folder/model.onnx` and judge it against the float
    model on the validation split: the manifest's `quantized.int8` entry."""
    from surgery.data import load_examples

    if recipe.data is None:
        raise ExportError(
            "int8 needs the recipe's `data:` (a calibration sample, and the validation split its parity gate measures)"
        )
    train, val = load_examples(recipe, model)
    export = recipe.export
    max_drop = export.QUANTIZE_MAX_DROP if export.quantize_max_drop is None else export.quantize_max_drop
    samples = export.calibration_samples or export.CALIBRATION_SAMPLES
    source, target = folder / ONNX, folder / INT8_ONNX
    external = (folder / f"{ONNX}.data").exists()
    if model.input_spec.kind == "text":
        _dynamic(source, target, external)
        method, calibrated = "dynamic (int8 weights; activations quantized per batch as they run)", 0
    else:
        sample = _sample(train, samples, recipe.train.seed)
        _static(source, target, _feeds(sample, model, input_names), external)
        calibrated = len(sample)
        method = (
            f"static QDQ (int8 weights per channel, int8 activations), calibrated on {calibrated} training "
            f"samples drawn with seed {recipe.train.seed}"
        )
    heads = compare(source, target, val, model, input_names, recipe)
    passed, reason = gate(heads, max_drop)
    return {
        "file": INT8_ONNX,
        "method": method,
        "calibration_samples": calibrated,
        "validation_samples": len(val),
        "max_drop": float(max_drop),
        "passed": passed,
        "reason": reason,
        "heads": heads,
    }


# --------------------------------------------------------------------------- quantizing


def _sample(examples: Any, size: int, seed: int) -> Any:
    """`size` examples drawn without replacement by `seed` (all of them when there are fewer)."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    return examples.subset(sorted(order[:size]))


def _batches(examples: Any, model: Any) -> Iterator[tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]]:
    """(inputs, targets) batches of `examples`, preprocessed as evaluation sees them."""
    from torch.utils.data import DataLoader

    from surgery.data import Collate, ExampleDataset

    loader = DataLoader(
        ExampleDataset(examples, model.input_spec),
        batch_size=BATCH,
        shuffle=False,
        num_workers=0,
        collate_fn=Collate(model.tokenizer, model.input_spec),
    )
    yield from loader


def _feeds(examples: Any, model: Any, input_names: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
    for inputs, _targets in _batches(examples, model):
        yield {name: t.numpy() for name, t in zip(input_names, inputs, strict=True)}


def _static(source: Path, target: Path, feeds: Iterator[dict[str, np.ndarray]], external: bool) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(feeds, None)

    with tempfile.TemporaryDirectory(prefix="surgery-int8-") as scratch:
        prepared = _prepared(source, Path(scratch), external)
        quantize_static(
            str(prepared),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            use_external_data_format=external,
        )


def _dynamic(source: Path, target: Path, external: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="surgery-int8-") as scratch:
        prepared = _prepared(source, Path(scratch), external)
        quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8, use_external_data_format=external)


def _prepared(source: Path, scratch: Path, external: bool) -> Path:
    """The graph after ONNX Runtime's pre-quantization pass (shape inference, folding), which
    lets more of it be quantized; the graph as exported where that pass cannot handle it."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = scratch / "prepared.onnx"
    # auto_merge: a transformer's sequence axis meets its position table (min(max_length, sequence)),
    # which symbolic shape inference gives up on otherwise. When it gives up, it saves the graph into
    # the current folder: work in the scratch folder so none of that lands in the user's.
    try:
        with contextlib.chdir(scratch):
            quant_pre_process(str(source), str(prepared), auto_merge=True, save_as_external_data=external)
    except Exception:  # an optimisation: without it the quantizer still works, on fewer nodes
        return source
    return prepared


# --------------------------------------------------------------------------- the parity gate


def monitored_metric(recipe: Any, head: str, task: str) -> str:
    """The metric the gate watches for `head`: the one `train.checkpoint.monitor` names for it,
    else the head's first metric, else accuracy (mae for regression)."""
    parts = recipe.train.checkpoint.monitor.split("/")
    if len(parts) == 3 and parts[1] == head and parts[2] != "loss":
        return parts[2]
    metrics = next((list(h.metrics) for h in recipe.heads if h.name == head), [])
    if metrics:
        return metrics[0]
    return "mae" if task == "regression" else "accuracy"


def compare(
    source: Path, target: Path, val: Any, model: Any, input_names: Sequence[str], recipe: Any
) -> dict[str, dict[str, Any]]:
    """Per head: the monitored metric of the float and the int8 graph on `val`, int8's drop,
    top-1 agreement and the largest output difference."""
    from surgery.metrics import compute_metric
    from surgery.runtimes import ONNXRUNTIME, ONNXRUNTIME_INT8, OnnxRuntime

    names = list(model.head_info)
    threads = os.cpu_count() or 1
    runtimes = {
        "float": OnnxRuntime(ONNXRUNTIME, source, input_names, names),
        "int8": OnnxRuntime(ONNXRUNTIME_INT8, target, input_names, names),
    }
    outputs: dict[str, dict[str, list[np.ndarray]]] = {kind: {n: [] for n in names} for kind in runtimes}
    targets: dict[str, list[torch.Tensor]] = {}
    for inputs, batch_targets in _batches(val, model):
        for kind, runtime in runtimes.items():
            for name, array in runtime.run(inputs, threads).items():
                outputs[kind][name].append(array)
        for name, values in batch_targets.items():
            targets.setdefault(name, []).append(values)
    report: dict[str, dict[str, Any]] = {}
    for name in names:
        task = model.head_info[name].task
        floats, int8s = (np.concatenate(outputs[kind][name]) for kind in ("float", "int8"))
        entry: dict[str, Any] = {
            "metric": None,
            "float_onnx": None,
            "int8_onnx": None,
            "drop": None,
            "top1_match": top1_match(floats, int8s, task),
            "max_abs_diff": float(np.abs(floats.astype(np.float64) - int8s).max()) if floats.size else 0.0,
        }
        if name in targets:
            metric = monitored_metric(recipe, name, task)
            truth = torch.cat(targets[name])
            before = compute_metric(metric, torch.from_numpy(floats), truth, task)
            after = compute_metric(metric, torch.from_numpy(int8s), truth, task)
            drop = after - before if metric in LOWER_IS_BETTER else before - after
            entry.update(metric=metric, float_onnx=before, int8_onnx=after, drop=drop)
        report[name] = entry
    return report


def top1_match(floats: np.ndarray, int8s: np.ndarray, task: str) -> float | None:
    """Share of predictions that agree: the top class (multiclass), or each 0/1 decision (binary,
    multilabel); None for regression, which has no top-1."""
    if floats.size == 0:
        return 1.0
    if task == "multiclass":
        return float((floats.argmax(-1) == int8s.argmax(-1)).mean())
    if task in ("binary", "multilabel"):
        return float(((floats > 0) == (int8s > 0)).mean())
    return None


def gate(heads: dict[str, dict[str, Any]], max_drop: float) -> tuple[bool, str | None]:
    """Passed, or failed with the reason (the worst head)."""
    measured = {name: h for name, h in heads.items() if h["drop"] is not None}
    if not measured:
        return False, "no head has validation targets to measure the int8 model against"
    worst = max(measured, key=lambda name: measured[name]["drop"])
    head = measured[worst]
    if head["drop"] > max_drop:
        return False, (
            f"head {worst}: {head['metric']} {head['float_onnx']:.4g} (float) vs {head['int8_onnx']:.4g} (int8), "
            f"a drop of {head['drop']:.4g} > export.quantize_max_drop {max_drop:g}"
        )
    return True, None
