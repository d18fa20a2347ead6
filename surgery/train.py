"""The training loop: one function, `fit(recipe, run_dir)`, called the same way by `surgery build`,
by DDP / Ray Train workers and by Ray Tune trials. It talks to a placement (`surgery.placement`)
for devices, ranks and gradient sync, and never asks which strategy that is.

`fit` reads top to bottom as the steps of a run: ask the placement for the device, seed, build the model, load the
data, make the optimizer and schedule, restore a checkpoint when resuming, then epochs of
(unfreeze due parameters → train steps with accumulation → validate → checkpoint → early stop).
Everything random derives from `train.seed` and is saved in checkpoints, so a CPU run killed and
resumed ends bit-identical to the same run uninterrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgery import checkpoint as ckpt
from surgery import features, oom
from surgery.data import TrainingData, load_data
from surgery.errors import SurgeryError
from surgery.features import FeatureCache
from surgery.memory import GpuStats, PeakMemory, planned_bytes
from surgery.monitor import Progress, RunMonitor, memory_scalars
from surgery.optim import build_optimizer, build_scheduler
from surgery.placement import SingleDevice, placement_for
from surgery.report import NoReport, Reporter
from surgery.runs import write_lock
from surgery.schema import Recipe


@dataclass
class FitResult:
    """What a finished `fit` leaves: checkpoints and the final metrics."""

    best_checkpoint: Path | None
    last_checkpoint: Path | None  # None on every rank but 0
    metrics: dict[str, float]
    stopped_early: bool


@dataclass
class TrainState:
    """Progress and watch state saved in every checkpoint (besides model/optimizer/RNG)."""

    epoch: int = 0  # epoch in progress (0-based)
    batch: int = 0  # micro-batches of `epoch` already consumed
    step: int = 0  # optimizer steps done
    best: float | None = None  # early stopping: best monitored value
    bad_epochs: int = 0  # early stopping: evaluations without improvement
    stopped_early: bool = False
    unfrozen_through: int = -1  # last epoch whose `unfreeze_at` entries were applied
    micro_split: int = 1  # micro-batches each loaded batch is cut into (grows on out-of-memory)
    eval_split: int = 1  # the same for validation batches
    oom_retries: int = 0  # steps retried after running out of memory
    metrics: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- set-up steps


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The autocast context of `train.precision` (fp32: none)."""
    if precision == "fp16" and device.type != "cuda":
        raise SurgeryError(f"train.precision fp16 needs a CUDA device (this run is on {device.type}); use bf16 or fp32")
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def with_class_names(recipe: Recipe, model: Any, class_names: dict[str, list[str]]) -> Recipe:
    """Fill unset head `labels` with the class names the data provided (folder names, label
    strings), so the bundle serves names; a user's own `labels` are never changed."""
    heads = []
    for head in recipe.heads:
        names = class_names.get(head.name)
        if head.labels is None and names and model.head_info[head.name].task == "multiclass":
            head = head.model_copy(update={"labels": list(names)})
            model.head_info[head.name] = model.head_info[head.name].with_labels(names)
        heads.append(head)
    return recipe.model_copy(update={"heads": heads})


# --------------------------------------------------------------------------- checkpoint state


def _trainer_state(
    state: TrainState, optimizer: Any, scheduler: Any, scaler: Any, model: Any, seed: int
) -> dict[str, Any]:
    from surgery.freeze import freeze_state

    optimizer_state = optimizer.state_dict()
    for group in optimizer_state["param_groups"]:
        group.pop("names", None)  # parameter names per group: rebuilt from the recipe, not stored
    trainable = freeze_state(model)
    return {
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": ckpt.rng_state(seed),
        # which parameters train, compactly: a mask in parameter order and the digest of the names it follows
        "freeze": {"names_sha256": _names_digest(trainable), "trainable": torch.tensor(list(trainable.values()))},
        "state": dataclasses.asdict(state),
    }


def _names_digest(names: Any) -> str:
    import hashlib

    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def _freeze_from(saved: dict[str, Any], model: Any) -> dict[str, bool]:
    """The `freeze_state` a checkpoint recorded (the compact mask, or the older name → bool form)."""
    if "trainable" not in saved:
        return saved
    names = [n for n, _ in model.named_parameters()]
    if _names_digest(names) != saved["names_sha256"]:
        raise ckpt.CheckpointError(
            "the checkpoint's freeze state is for other parameter names; was the recipe's model changed?"
        )
    return dict(zip(names, (bool(b) for b in saved["trainable"].tolist()), strict=True))


def _save(
    placement: SingleDevice,
    run_dir: Path,
    recipe: Recipe,
    recipe_text: str,
    state: TrainState,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    reference: dict[str, str],
) -> Path | None:
    """Checkpoint the run (rank 0 writes, every rank returns when it is on disk); the path on rank 0.
    Frozen tensors are referenced by their digests in `reference` (taken when the model was built)."""
    from surgery.recipe import recipe_hash

    meta = {
        "epoch": state.epoch,
        "step": state.step,
        "batch_in_epoch": state.batch,
        "metrics": state.metrics,
        "recipe_sha256": recipe_hash(recipe, portable=True),
    }
    c = recipe.train.checkpoint
    path = None
    if placement.is_main:  # one writer; the other ranks wait until the checkpoint is complete
        path = ckpt.save_checkpoint(
            run_dir,
            model=model,
            trainer_state=_trainer_state(state, optimizer, scheduler, scaler, model, recipe.train.seed),
            meta=meta,
            recipe_text=recipe_text,
            monitor=c.monitor,
            mode=c.mode,
            keep_best=c.keep_best,
            reference=reference,
        )
    placement.barrier()
    return path


def _restore(
    run_dir: Path,
    recipe: Recipe,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    *,
    force: bool,
    progress: Progress,
) -> tuple[TrainState, dict[str, Any]]:
    """Load the last complete checkpoint after checking the resume contract; RNG state is returned
    to be applied last, right before training continues."""
    from surgery.freeze import load_freeze_state
    from surgery.recipe import load_recipe_text, recipe_hash

    last = ckpt.find_last(run_dir)
    meta = ckpt.read_meta(last)
    if meta.get("recipe_sha256") != recipe_hash(recipe, portable=True):
        old = load_recipe_text((last / ckpt.RECIPE_FILE).read_text(), filename=str(last / ckpt.RECIPE_FILE))
        changes = ckpt.check_resume(old, recipe, force=force)
        progress.note("resuming with a changed recipe:\n" + "\n".join(changes))
    trainer, meta = ckpt.load_checkpoint(last, model)
    load_freeze_state(model, _freeze_from(trainer["freeze"], model))
    names = [group.get("names") for group in optimizer.param_groups]
    optimizer.load_state_dict(trainer["optimizer"])
    for group, group_names in zip(optimizer.param_groups, names, strict=True):
        if group_names is not None:
            group["names"] = group_names
    scheduler.load_state_dict(trainer["scheduler"])
    scaler.load_state_dict(trainer["scaler"])
    state = TrainState(**trainer["state"])
    progress.note(f"resuming from {last} (epoch {state.epoch + 1}, batch {state.batch}, step {state.step})")
    return state, trainer["rng"]


# --------------------------------------------------------------------------- loop steps


def _to_device(batch: tuple[Any, dict[str, torch.Tensor]], device: torch.device) -> tuple[Any, dict[str, torch.Tensor]]:
    """A batch on `device`: inputs are a tuple of model inputs, or a dict of cached head inputs."""
    inputs, targets = batch
    blocking = device.type == "cuda"
    moved = (
        {k: t.to(device, non_blocking=blocking) for k, t in inputs.items()}
        if isinstance(inputs, dict)
        else tuple(t.to(device, non_blocking=blocking) for t in inputs)
    )
    return moved, {k: t.to(device, non_blocking=blocking) for k, t in targets.items()}


def _forward(net: Any, inputs: Any) -> dict[str, torch.Tensor]:
    """The model's outputs for model inputs, or the heads' alone for cached head inputs."""
    return net(head_inputs=inputs) if isinstance(inputs, dict) else net(*inputs)


def _groups(loader_iter: Iterator[Any], first: int, total: int, accumulate: int) -> Iterator[list[Any]]:
    """Micro-batches grouped per optimizer step; group boundaries are fixed by position in the
    epoch (so a resumed epoch groups exactly as the uninterrupted one)."""
    group: list[Any] = []
    for position in range(first, total):
        group.append(next(loader_iter))
        if (position + 1) % accumulate == 0 or position + 1 == total:
            yield group
            group = []


def _accumulate(
    net: Any,
    model: Any,
    group: list[Any],
    split: int,
    recipe: Recipe,
    placement: SingleDevice,
    scaler: Any,
    agreed: list[bool],
) -> tuple[torch.Tensor, int]:
    """Forward and backward of one optimizer step: each loaded batch of `group` cut into `split`
    micro-batches, each piece's loss weighted by its share, so the gradient is the step's mean.
    Returns the summed batch losses and the samples seen."""
    from surgery.heads import compute_losses

    device = placement.device
    loss_sum, samples = torch.zeros((), device=device), 0
    for i, batch in enumerate(group):
        inputs, targets = _to_device(batch, device)
        parts = oom.pieces(inputs, targets, split)
        for j, (x, y, share) in enumerate(parts):
            last = i == len(group) - 1 and j == len(parts) - 1
            with placement.no_sync(net, last=last):
                with autocast(recipe.train.precision, device):
                    outputs = _forward(net, x)
                    loss, _per_head = compute_losses(model, outputs, y, recipe)
                if last:  # every rank says it got here before the backward that synchronises them
                    if oom.any_rank(placement, False):
                        raise oom.PeerOutOfMemory
                    agreed[0] = True
                scaler.scale(loss / (len(group) / share)).backward()
            loss_sum += loss.detach().float() * share
        samples += oom.batch_size(targets)
    return loss_sum, samples


def _train_step(
    net: Any,
    model: Any,
    group: list[Any],
    state: TrainState,
    recipe: Recipe,
    placement: SingleDevice,
    scaler: Any,
    optimizer: Any,
    monitor: RunMonitor,
    progress: Progress,
) -> tuple[torch.Tensor, int]:
    """`_accumulate` at the run's micro-batch split; on out-of-memory, free the step's memory,
    cut micro-batches in half (accumulating twice as many: the same effective batch and learning
    rate), log it and retry the same step. `state.micro_split` keeps the split (checkpointed)."""
    batch = recipe.data.batch_size if recipe.data else 1
    while True:
        agreed, mine = [False], False
        try:
            return _accumulate(net, model, group, state.micro_split, recipe, placement, scaler, agreed)
        except torch.OutOfMemoryError as err:
            error, mine = str(err), True
        except oom.PeerOutOfMemory:
            error = "another rank ran out of memory"
        if mine and placement.world_size > 1:
            if agreed[0]:
                raise oom.unrecoverable(placement.device, state.step, error)
            oom.any_rank(placement, True)
        oom.free_memory(placement.device, optimizer)
        split = oom.next_split(state.micro_split, batch, device=placement.device, step=state.step, error=error)
        micro, accumulate = math.ceil(batch / split), recipe.train.accumulate * split
        progress.note(
            f"out of memory on {placement.device} at step {state.step + 1}: micro-batch {math.ceil(batch / state.micro_split)} → "
            f"{micro}, accumulating {accumulate} per step (effective batch {batch * recipe.train.accumulate} unchanged); "
            "retrying the step"
        )
        state.micro_split, state.oom_retries = split, state.oom_retries + 1
        monitor.scalars(
            state.step, {"train/micro_batch": micro, "train/oom_retries": state.oom_retries}, epoch=state.epoch
        )


def _clip_gradients(
    model: Any, optimizer: Any, scaler: Any, clip: float | None, *, measure: bool
) -> torch.Tensor | None:
    """Clip the gradients' global norm to `clip` (if set); the norm before clipping when clipping
    or `measure` (logging steps only: it costs a pass over the gradients), else None."""
    if not (clip or measure):
        return None
    scaler.unscale_(optimizer)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if clip:
        return torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
    return torch.nn.utils.get_total_norm(grads) if grads else None


def _feature_cache(
    model: Any,
    recipe: Recipe,
    data: TrainingData,
    state: TrainState,
    run_dir: Path,
    placement: SingleDevice,
    reference: dict[str, str],
    progress: Progress,
) -> FeatureCache | None:
    """The frozen-feature cache, when `train.cache_features` allows it and it is exact; one line
    says whether it is used, and why (`on` when it isn't exact is an error saying why)."""
    setting = recipe.train.cache_features
    if setting == "off":
        return None
    decision = features.decide(
        model,
        recipe,
        epoch=state.epoch,
        applied_through=state.unfrozen_through,
        num_samples=data.num_train + data.num_val,
    )
    if not decision.cache:
        if setting == "on":
            raise features.explain_refusal(decision)
        progress.note(f"feature cache: not used: {decision.reason}")
        return None
    cache, reused = features.build_or_load(
        model,
        recipe,
        data,
        decision,
        run_dir=run_dir,
        device=placement.device,
        autocast=lambda: autocast(recipe.train.precision, placement.device),
        weights_digest=ckpt.frozen_digest(reference, list(reference)),
        write=placement.is_main,
    )
    how = "reused from" if reused else "computed once into"
    progress.note(f"feature cache: heads train on features {how} {run_dir / features.FEATURES_DIR}: {decision.reason}")
    return cache


def evaluate(
    net: Any,
    model: Any,
    data: TrainingData,
    recipe: Recipe,
    placement: SingleDevice,
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
            inputs, targets = _to_device(batch, device)
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
    placement: SingleDevice,
    progress: Progress | None,
) -> dict[str, torch.Tensor]:
    """One validation batch's outputs, forwarded in `state.eval_split` pieces; finer on out-of-memory."""
    n = oom.batch_size(targets)
    while True:
        try:
            parts = [_forward(net, x) for x, _y, _share in oom.pieces(inputs, targets, state.eval_split)]
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


def _early_stop(state: TrainState, recipe: Recipe) -> bool:
    """Update early-stopping state from `state.metrics`; True when patience ran out."""
    es = recipe.train.early_stopping
    if es is None or es.monitor not in state.metrics:
        return False
    value = state.metrics[es.monitor]
    if _improved(value, state.best, es.mode, es.min_delta):
        state.best, state.bad_epochs = value, 0
        return False
    state.bad_epochs += 1
    return state.bad_epochs >= es.patience


# --------------------------------------------------------------------------- fit


def fit(
    recipe: Recipe,
    run_dir: Path,
    *,
    resume: bool = False,
    force: bool = False,
    placement: SingleDevice | None = None,
    reporter: Reporter | None = None,
) -> FitResult:
    """Train `recipe` into `run_dir` (checkpoints/, tb/, metrics.jsonl, recipe.lock.yaml).

    `resume`: continue from the run's last complete checkpoint (refused when the recipe changed
    in an unsafe way, unless `force`). `placement`: this process's part of `recipe.placement`
    (made from the recipe when not given). Returns the best and last checkpoints and final metrics.
    """
    from surgery.freeze import apply_unfreeze_schedule, set_frozen_batchnorm_eval
    from surgery.model import build_model
    from surgery.recipe import dump_recipe

    run_dir = Path(run_dir)
    placement = placement or placement_for(recipe)
    main, device = placement.is_main, placement.device
    train_cfg = recipe.train
    autocast(train_cfg.precision, device)  # fp16 on CPU fails here, before any work
    progress = Progress(recipe.monitor.progress, enabled=main)

    # 1. seed and build (build_model applies the freeze rules); `net` is the model as placed.
    # Checkpoints reference frozen tensors by the digests taken here; memory is measured against plan.
    peak_memory = PeakMemory(device)
    seed_everything(train_cfg.seed)
    model = build_model(recipe)
    reference = ckpt.tensor_digests(model)
    planned = planned_bytes(model, recipe, device) if main else None
    net = placement.prepare_model(model)

    # 2. data (bad data fails here, before training starts)
    with peak_memory.excluding():  # the data held in memory is not training memory
        data = load_data(recipe, model, placement)
    recipe = with_class_names(recipe, model, data.class_names)
    recipe_text = dump_recipe(recipe)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_lock(recipe, run_dir)

    # 3. optimizer, schedule, scaler
    batches_per_epoch = data.sampler.batches_per_epoch
    steps_per_epoch = math.ceil(batches_per_epoch / train_cfg.accumulate)
    total_steps = train_cfg.epochs * steps_per_epoch
    if train_cfg.max_steps:
        total_steps = min(total_steps, train_cfg.max_steps)
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, recipe, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=train_cfg.precision == "fp16")

    # 4. resume
    state, rng = TrainState(), None
    if resume:
        state, rng = _restore(run_dir, recipe, model, optimizer, scheduler, scaler, force=force, progress=progress)
        net = placement.prepare_model(model)  # the restored trainable set may differ from the built one
    monitor = RunMonitor(run_dir, recipe, resume_step=state.step if resume else None, enabled=main)
    if not resume and main:
        model.eval()
        monitor.graph(model, tuple(t.to(device) for t in model.example_inputs(2)))
    monitor.skipped_files(state.step, data.skipped)
    if data.skipped:
        progress.note(
            f"left out {len(data.skipped)} unreadable file(s) (data.on_bad_file: skip): {_some_files(data.skipped)}"
        )
    cache = _feature_cache(model, recipe, data, state, run_dir, placement, reference, progress)
    gpu = GpuStats(device)
    if rng is not None:
        ckpt.set_rng_state(rng)  # last: nothing random may run between this and the next batch

    # 5. epochs
    last_path: Path | None = None
    epoch_scalars: dict[str, float] = {"system/peak_mib": 0.0}
    saved = False  # the same on every rank (unlike last_path, which only rank 0 knows)
    started = time.perf_counter()
    done = state.step >= total_steps or state.stopped_early
    while not done and state.epoch < train_cfg.epochs:
        epoch = state.epoch
        if state.unfrozen_through < epoch:
            newly = apply_unfreeze_schedule(model, recipe, epoch)
            state.unfrozen_through = epoch
            if newly:
                net = placement.prepare_model(model)  # DDP must learn the new trainable set
                progress.note(f"epoch {epoch + 1}: unfroze {len(newly)} parameters")
        if cache is not None and not cache.covers(epoch):
            cache = None
            if main:
                features.drop(run_dir)
            progress.note(f"epoch {epoch + 1}: feature cache dropped (train.unfreeze_at unfroze part of the backbone)")
        net.train()
        set_frozen_batchnorm_eval(model, recipe)
        data.sampler.set_epoch(epoch, skip=state.batch)
        progress.start_epoch(epoch, train_cfg.epochs, batches_per_epoch, done=state.batch)
        peak_memory.start()
        epoch_start = time.perf_counter()
        loader_iter = iter(cache.train_batches(data.sampler) if cache else data.train)
        window_loss = torch.zeros((), device=device)
        window_batches, window_samples, window_start = 0, 0, time.perf_counter()
        shown: dict[str, float] = {}
        for group in _groups(loader_iter, state.batch, batches_per_epoch, train_cfg.accumulate):
            loss_sum, samples = _train_step(
                net, model, group, state, recipe, placement, scaler, optimizer, monitor, progress
            )
            window_loss += loss_sum
            window_batches += len(group)
            window_samples += samples
            log = (state.step + 1) % recipe.monitor.log_every_steps == 0
            grad_norm = _clip_gradients(model, optimizer, scaler, train_cfg.clip_grad_norm, measure=log)
            scaler.step(optimizer)
            scaler.update()
            state.step += 1
            state.batch += len(group)
            if main and (state.batch >= batches_per_epoch or state.step >= total_steps):
                monitor.histograms(model, state.step)  # once per epoch, while the gradients exist
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if log:
                elapsed = max(1e-9, time.perf_counter() - window_start)
                throughput = window_samples / elapsed
                shown = {"train/loss": float(window_loss) / max(1, window_batches)}
                scalars = {**shown, "train/samples_per_s": throughput, **_lrs(optimizer), **memory_scalars(device)}
                if grad_norm is not None:
                    scalars["train/grad_norm"] = float(grad_norm)
                scalars.update(gpu.scalars())
                monitor.scalars(state.step, scalars, epoch=epoch)
                window_loss.zero_()
                window_batches, window_samples, window_start = 0, 0, time.perf_counter()
                progress.update(state.batch, shown, throughput, log=True)
            elif progress.mode == "rich":
                progress.update(
                    state.batch, shown, window_samples / max(1e-9, time.perf_counter() - window_start), log=False
                )
            if shown:
                state.metrics["train/loss"] = shown["train/loss"]
            at_end = state.batch >= batches_per_epoch
            out_of_steps = state.step >= total_steps
            every = train_cfg.checkpoint.every_steps
            if every and state.step % every == 0 and not (at_end or out_of_steps):
                last_path = _save(
                    placement, run_dir, recipe, recipe_text, state, model, optimizer, scheduler, scaler, reference
                )
                saved = True
            if out_of_steps:
                break

        # end of epoch (or of the step budget): validate, checkpoint, maybe stop
        last_epoch = state.epoch + 1 >= train_cfg.epochs or state.step >= total_steps
        evaluated = (epoch + 1) % train_cfg.eval_every_epochs == 0 or last_epoch
        epoch_scalars = {
            "time/epoch_s": time.perf_counter() - epoch_start,
            "system/peak_mib": peak_memory.peak() / 2**20,
        }
        if planned is not None:
            epoch_scalars["system/plan_estimate_mib"] = planned / 2**20
        if main:
            monitor.scalars(state.step, epoch_scalars, epoch=epoch)
        if evaluated:
            metrics, first, tracker = evaluate(net, model, data, recipe, placement, cache, state, progress)
            state.metrics.update(metrics)
            if main:
                monitor.scalars(state.step, metrics, epoch=epoch)
                monitor.classification_reports(tracker, model.head_info, data.class_names, state.step, epoch)
                _log_samples(monitor, model, first, data, state.step)
            if _early_stop(state, recipe):
                state.stopped_early = True
        progress.end_epoch({k: v for k, v in state.metrics.items() if k.startswith("val/")} if evaluated else {})
        state.epoch, state.batch = epoch + 1, 0
        done = last_epoch or state.stopped_early
        epoch_checkpoint = None
        if train_cfg.checkpoint.every_epoch or done:
            last_path = epoch_checkpoint = _save(
                placement, run_dir, recipe, recipe_text, state, model, optimizer, scheduler, scaler, reference
            )
            saved = True
        if evaluated:
            (reporter or NoReport()).report(epoch, dict(state.metrics), epoch_checkpoint)

    # 6. finish
    elapsed = time.perf_counter() - started
    if not saved:  # nothing left to train (a finished run resumed), or no epoch saves
        if resume:
            last_path = ckpt.find_last(run_dir) if main else None
        else:
            last_path = _save(
                placement, run_dir, recipe, recipe_text, state, model, optimizer, scheduler, scaler, reference
            )
    best = None
    if main:
        monitor.hparams(state.metrics)
        monitor.close()
        index = ckpt.read_index(run_dir)
        best = run_dir / ckpt.CHECKPOINTS / index["best"][0][0] if index.get("best") else None
        rows = {
            "time (s)": round(elapsed, 1),
            f"peak memory, last epoch (MiB, {peak_memory.kind})": round(epoch_scalars["system/peak_mib"], 1),
        }
        if planned is not None:
            rows["surgery plan's estimate (MiB)"] = round(planned / 2**20, 1)
        rows["feature cache"] = "used" if cache is not None else "not used"
        progress.summary(f"{recipe.name}: run summary", _summary_rows(recipe, state, data, best, rows))
    return FitResult(best, last_path, dict(state.metrics), state.stopped_early)


def _summary_rows(
    recipe: Recipe, state: TrainState, data: TrainingData, best: Path | None, measured: dict[str, Any]
) -> dict[str, Any]:
    """The run summary table: final metrics, progress, what was `measured`, and what went unusual."""
    rows: dict[str, Any] = dict(sorted(state.metrics.items()))
    rows.update({"epochs": state.epoch, "steps": state.step, "stopped early": state.stopped_early, **measured})
    if state.oom_retries:
        rows["out-of-memory retries"] = state.oom_retries
        rows["micro-batch (samples)"] = math.ceil((recipe.data.batch_size if recipe.data else 1) / state.micro_split)
    if best is not None:
        rows["best checkpoint"] = best.name
    if data.skipped:
        rows["skipped files"] = f"{len(data.skipped)}: {_some_files(data.skipped)}"
    return rows


def _some_files(skipped: list[tuple[str, str]], n: int = 5) -> str:
    shown = ", ".join(Path(file).name for file, _ in skipped[:n])
    return shown + (f" and {len(skipped) - n} more (metrics.jsonl lists them all)" if len(skipped) > n else "")


def _lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    lrs: dict[str, float] = {}
    for group in optimizer.param_groups:
        lrs[f"lr/scale_{group.get('lr_scale', 1.0):g}"] = float(group["lr"])
    return lrs
