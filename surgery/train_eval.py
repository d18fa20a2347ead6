"""Validation during training: losses and metrics over the validation set reduced over ranks
(in finer pieces when memory runs out), what is logged of them (scalars, classification reports,
sample predictions), and early stopping on the monitored value."""

from __future__ import annotations

import math
from typing import Any

import torch

from surgery import oom
from surgery.data import TrainingData
from surgery.features import FeatureCache
from surgery.monitor import Progress, RunMonitor
from surgery.ranks import Placement
from surgery.schema import Recipe
from surgery.train_state import TrainState
from surgery.train_step import autocast, forward, to_device


def evaluate(
    net: Any,
    model: Any,
    data: TrainingData,
    recipe: Recipe,
    placement: Placement,
    cache: FeatureCache | None = None,
    state: TrainState | None = None,
    progress: Progress | None = None,
) -> tuple[dict[str, float], Any, Any]:
    """Validation losses and metrics under inference mode, reduced over ranks; also the first
    batch (for samples) and the tracker holding every output. `net` is the prepared model, `model`
    the `SurgicalModel` inside it; with `cache`, the heads run on cached validation features.
    Out of memory, a batch is evaluated in finer pieces (`state.eval_split`, kept for the run)."""
    from surgery.heads import compute_losses
    from surgery.metrics import MetricTracker

    device = placement.device
    net.eval()
    tracker = MetricTracker(recipe, model.head_info)
    totals: dict[str, float] = {}
    count = 0
    first = None
    batches = cache.val_batches_with(data.val) if cache is not None else data.val
    with torch.inference_mode(), autocast(recipe.train.precision, device):
        for batch in batches:
            inputs, targets = to_device(batch, device)
            outputs = _eval_forward(net, inputs, targets, state or TrainState(), placement, progress)
            loss, per_head = compute_losses(model, outputs, targets, recipe)
            n = oom.batch_size(targets)
            count += n
            totals["val/loss"] = totals.get("val/loss", 0.0) + float(loss) * n
            for name, value in per_head.items():
                totals[f"val/{name}/loss"] = totals.get(f"val/{name}/loss", 0.0) + float(value) * n
            tracker.update({k: v.float() for k, v in outputs.items()}, targets)
            if first is None:
                shown = cache.first_val_inputs if cache is not None else inputs
                first = (shown, targets, {k: v.float().cpu() for k, v in outputs.items()})
    metrics = {k: v / max(1, count) for k, v in totals.items()}
    metrics.update(tracker.compute())
    return placement.all_reduce(metrics, weight=count), first, tracker


def _eval_forward(
    net: Any,
    inputs: Any,
    targets: dict[str, torch.Tensor],
    state: TrainState,
    placement: Placement,
    progress: Progress | None,
) -> dict[str, torch.Tensor]:
    """One validation batch's outputs, forwarded in `state.eval_split` pieces; finer on out-of-memory."""
    n = oom.batch_size(targets)
    while True:
        try:
            parts = [forward(net, x) for x, _y, _share in oom.pieces(inputs, targets, state.eval_split)]
            return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        except torch.OutOfMemoryError as err:
            error = str(err)
        oom.free_memory(placement.device)
        split = oom.next_split(state.eval_split, n, device=placement.device, step=state.step, error=error)
        if progress is not None:
            progress.note(
                f"out of memory on {placement.device} in validation: evaluating batches of {n} in pieces of "
                f"{math.ceil(n / split)} (set data.eval_batch_size to choose)"
            )
        state.eval_split = split


def validate(
    epoch: int,
    state: TrainState,
    net: Any,
    model: Any,
    data: TrainingData,
    recipe: Recipe,
    placement: Placement,
    cache: FeatureCache | None,
    monitor: RunMonitor,
    progress: Progress,
) -> None:
    """Evaluate at the end of `epoch`: metrics into `state.metrics` and the monitor (rank 0), and
    `state.stopped_early` when early stopping's patience ran out."""
    metrics, first, tracker = evaluate(net, model, data, recipe, placement, cache, state, progress)
    state.metrics.update(metrics)
    if placement.is_main:
        monitor.scalars(state.step, metrics, epoch=epoch)
        monitor.classification_reports(tracker, model.head_info, data.class_names, state.step, epoch)
        _log_samples(monitor, model, first, data, state.step)
    if _early_stop(state, recipe, epochs_done=epoch + 1):
        state.stopped_early = True


def _log_samples(monitor: RunMonitor, model: Any, first: Any, data: TrainingData, step: int) -> None:
    if first is None or model.input_spec.kind != "image":
        return
    inputs, targets, outputs = first
    head = next((name for name, info in model.head_info.items() if info.task == "multiclass"), None)
    if head is None:
        return
    k = monitor.settings.sample_predictions
    names = data.class_names.get(head) or model.head_info[head].labels
    label = lambda i: str(names[i]) if names and i < len(names) else str(i)  # noqa: E731
    predicted = outputs[head][:k].argmax(-1).tolist()
    truth = targets[head][:k].cpu().tolist()
    monitor.sample_predictions(
        inputs[0][:k].cpu(), [label(p) for p in predicted], [label(t) for t in truth], model.input_spec, step
    )


def _improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def _early_stop(state: TrainState, recipe: Recipe, *, epochs_done: int) -> bool:
    """Update early-stopping state from `state.metrics` after an evaluation at `epochs_done`
    epochs; True when patience ran out. Patience counts epochs, not evaluations: with
    `eval_every_epochs: 2`, an evaluation without improvement spends two epochs of it."""
    es = recipe.train.early_stopping
    if es is None or es.monitor not in state.metrics:
        return False
    value = state.metrics[es.monitor]
    if math.isfinite(value) and _improved(value, state.best, es.mode, es.min_delta):
        state.best, state.best_epoch, state.bad_epochs = value, epochs_done, 0
        return False
    if state.best_epoch is None:
        # nothing improved yet: count from the start; a checkpoint written before epochs were
        # recorded counted evaluations, each one epoch here
        state.best_epoch = 0 if state.best is None else epochs_done - 1 - state.bad_epochs
    state.bad_epochs = epochs_done - state.best_epoch
    return state.bad_epochs >= es.patience
