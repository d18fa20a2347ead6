"""The training loop: one function, `fit(recipe, run_dir)`, called the same way by `surgery build`,
by DDP / Ray Train workers and by Ray Tune trials. It talks to a placement (`surgery.placement`)
for devices, ranks and gradient sync, and never asks which strategy that is; it hands each
evaluated epoch to the reporter it is given (`surgery.report`), and never asks who listens.

`fit` reads top to bottom as the steps of a run: set-up (ask the placement for the device, seed,
build the model, load the data, make the optimizer and schedule, restore a checkpoint when
resuming), then epochs of begin (unfreeze due parameters) → train (steps with accumulation,
mid-epoch checkpoints) → end (validate, checkpoint, report, early stop), then the summary. Each
phase takes what it works on as arguments: the fixed `Run`, the `TrainingParts` that steps
update, the checkpointed `TrainState` and the `Checkpointer`.

The pieces live apart: `train_state` (what checkpoints hold, the checkpointer), `train_step` (one
optimizer step), `train_eval` (validation and early stopping); their public names are imported
from here as well.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surgery import checkpoint as ckpt
from surgery import features
from surgery.data import TrainingData, load_data
from surgery.features import FeatureCache
from surgery.memory import GpuStats, PeakMemory
from surgery.monitor import Progress, RunMonitor, memory_scalars
from surgery.optim import build_optimizer, build_scheduler
from surgery.placement import placement_for
from surgery.plan import planned_bytes
from surgery.ranks import Placement
from surgery.report import NoReport, Reporter
from surgery.runs import write_lock
from surgery.schema import Recipe
from surgery.train_eval import evaluate, validate
from surgery.train_state import Checkpointer, TrainState, seed_everything
from surgery.train_step import (
    LogWindow,
    autocast,
    clip_gradients,
    count_nonfinite,
    floating_buffers,
    groups,
    learning_rates,
    nonfinite_part,
    restore_buffers,
    train_step,
)

__all__ = [
    "Checkpointer",
    "FitResult",
    "TrainState",
    "autocast",
    "evaluate",
    "fit",
    "seed_everything",
    "train_on_ray",
    "with_class_names",
]


@dataclass
class FitResult:
    """What a finished `fit` leaves: checkpoints and the final metrics."""

    best_checkpoint: Path | None
    last_checkpoint: Path | None  # None on every rank but 0
    metrics: dict[str, float]
    stopped_early: bool


@dataclass(frozen=True)
class Budget:
    """How long a run trains: `epochs` of `batches` loaded batches, at most `steps` optimizer steps."""

    epochs: int
    batches: int
    steps_per_epoch: int
    steps: int

    @classmethod
    def of(cls, recipe: Recipe, batches_per_epoch: int) -> Budget:
        steps_per_epoch = math.ceil(batches_per_epoch / recipe.train.accumulate)
        steps = recipe.train.epochs * steps_per_epoch
        if recipe.train.max_steps:
            steps = min(steps, recipe.train.max_steps)
        return cls(recipe.train.epochs, batches_per_epoch, steps_per_epoch, steps)


@dataclass(frozen=True)
class Run:
    """What stays the same through a run's epochs (made by the set-up of `fit`)."""

    recipe: Recipe  # as resolved for this run (class names filled in)
    run_dir: Path
    placement: Placement
    budget: Budget
    data: TrainingData
    monitor: RunMonitor  # TensorBoard, metrics.jsonl, W&B: rank 0 only
    progress: Progress  # the terminal: rank 0 only


@dataclass
class TrainingParts:
    """What the steps update: the model, the model as placed (`net`, placed again when the
    trainable set changes), the optimizer, the learning-rate schedule and the gradient scaler."""

    model: Any
    net: Any
    optimizer: Any
    scheduler: Any
    scaler: Any


def fit(
    recipe: Recipe,
    run_dir: Path,
    *,
    resume: bool = False,
    force: bool = False,
    placement: Placement | None = None,
    reporter: Reporter | None = None,
) -> FitResult:
    """Train `recipe` into `run_dir` (checkpoints/, tb/, metrics.jsonl, recipe.lock.yaml).

    `resume`: continue from the run's last complete checkpoint (refused when the recipe changed
    in an unsafe way, unless `force`). `placement`: this process's part of `recipe.placement`
    (made from the recipe when not given). `reporter`: who is handed each evaluated epoch (Ray
    Train, a Tune trial; nobody when not given). Returns the best and last checkpoints and final
    metrics.
    """
    from surgery.model import build_model
    from surgery.recipe import dump_recipe

    run_dir, placement, reporter = Path(run_dir), placement or placement_for(recipe), reporter or NoReport()
    main, device = placement.is_main, placement.device
    autocast(recipe.train.precision, device)  # fp16 on CPU fails here, before any work
    progress = Progress(recipe.monitor.progress, enabled=main)

    # 1. seed and build (build_model applies the freeze rules); `net` is the model as placed.
    # Checkpoints reference frozen tensors by the digests taken here; memory is measured against plan.
    peak_memory = PeakMemory(device)
    seed_everything(recipe.train.seed)
    model = build_model(recipe)
    reference = ckpt.tensor_digests(model)
    planned = planned_bytes(model, recipe, device) if main else None
    net = placement.prepare_model(model)

    # 2. data (bad data fails here, before training starts)
    with peak_memory.excluding():  # the data held in memory is not training memory
        data = load_data(recipe, model, placement)
    recipe = with_class_names(recipe, model, data.class_names)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_lock(recipe, run_dir)

    # 3. optimizer, schedule, scaler, and the checkpointer that saves them with the model
    budget = Budget.of(recipe, data.sampler.batches_per_epoch)
    parts = _training_parts(model, net, recipe, budget, device)
    checkpointer = Checkpointer(
        placement,
        run_dir,
        recipe,
        dump_recipe(recipe),
        model,
        parts.optimizer,
        parts.scheduler,
        parts.scaler,
        reference,
    )

    # 4. resume; then what watches the run, the feature cache, and the RNG state restored last
    state, rng = TrainState(), None
    if resume:
        state, rng = checkpointer.restore(force=force, progress=progress)
        parts.net = placement.prepare_model(model)  # the restored trainable set may differ from the built one
    monitor = _open_monitor(run_dir, recipe, model, data, state, placement, progress, resumed=resume)
    run = Run(recipe, run_dir, placement, budget, data, monitor, progress)
    cache = _feature_cache(model, recipe, data, state, run_dir, placement, reference, progress)
    gpu = GpuStats(device)
    if rng is not None:
        ckpt.set_rng_state(rng)  # last: nothing random may run between this and the next batch

    # 5. epochs: begin (unfreeze) → train steps → end (validate, checkpoint, report, early stop)
    epoch_scalars: dict[str, float] = {"system/peak_mib": 0.0}
    started = time.perf_counter()
    done = state.step >= budget.steps or state.stopped_early
    while not done and state.epoch < budget.epochs:
        epoch = state.epoch
        cache = _begin_epoch(run, epoch, state, parts, cache)
        peak_memory.start()
        epoch_start = time.perf_counter()
        batches = iter(cache.train_batches(data.sampler) if cache else data.train)
        _train_epoch(run, batches, state, parts, checkpointer, gpu)
        epoch_scalars = _epoch_scalars(time.perf_counter() - epoch_start, peak_memory, planned)
        done = _end_epoch(run, epoch, state, parts, cache, checkpointer, reporter, epoch_scalars)

    # 6. finish: the last checkpoint (saved now if the run saved none), the summary
    elapsed = time.perf_counter() - started
    last = checkpointer.final(state, resumed=resume)
    best = None
    if main:
        monitor.hparams(state.metrics)
        monitor.close()
        best = checkpointer.best()
        measured = _measured(elapsed, epoch_scalars, peak_memory.kind, planned, cached=cache is not None)
        progress.summary(f"{recipe.name}: run summary", _summary_rows(recipe, state, data, best, measured))
    return FitResult(best, last, dict(state.metrics), state.stopped_early)


# --------------------------------------------------------------------------- set-up


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


def _training_parts(model: Any, net: Any, recipe: Recipe, budget: Budget, device: torch.device) -> TrainingParts:
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, recipe, total_steps=budget.steps, steps_per_epoch=budget.steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=recipe.train.precision == "fp16")
    return TrainingParts(model, net, optimizer, scheduler, scaler)


def train_on_ray(
    recipe: Recipe, run_dir: Path, *, resume: bool = False, force: bool = False, callbacks: Sequence[Any] = ()
) -> Any:
    """`fit` for `recipe` on Ray Train's `TorchTrainer` into the existing `run_dir` (see
    `surgery.ray_train.train_on_ray`, the launcher, which is handed `fit` here). `callbacks` are
    Ray Train callbacks (Ray Tune passes a `TuneReportCallback`). Returns Ray's `Result`."""
    from surgery.ray_train import train_on_ray as launch_on_ray_train

    return launch_on_ray_train(fit, recipe, run_dir, resume=resume, force=force, callbacks=callbacks)


def _open_monitor(
    run_dir: Path,
    recipe: Recipe,
    model: Any,
    data: TrainingData,
    state: TrainState,
    placement: Placement,
    progress: Progress,
    *,
    resumed: bool,
) -> RunMonitor:
    """The run's monitor (continuing a resumed run's logs from its step), with the model graph
    of a new run and the files the data left out."""
    monitor = RunMonitor(run_dir, recipe, resume_step=state.step if resumed else None, enabled=placement.is_main)
    if not resumed and placement.is_main:
        model.eval()
        monitor.graph(model, tuple(t.to(placement.device) for t in model.example_inputs(2)))
    monitor.skipped_files(state.step, data.skipped)
    if data.skipped:
        progress.note(
            f"left out {len(data.skipped)} unreadable file(s) (data.on_bad_file: skip): {_some_files(data.skipped)}"
        )
    return monitor


def _feature_cache(
    model: Any,
    recipe: Recipe,
    data: TrainingData,
    state: TrainState,
    run_dir: Path,
    placement: Placement,
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


# --------------------------------------------------------------------------- an epoch


def _begin_epoch(
    run: Run, epoch: int, state: TrainState, parts: TrainingParts, cache: FeatureCache | None
) -> FeatureCache | None:
    """Unfreeze what `train.unfreeze_at` makes due (placing the model again), drop a feature cache
    that unfreezing outdated, and set the model and data up for `epoch`; the cache still in use."""
    from surgery.freeze import apply_unfreeze_schedule, set_frozen_batchnorm_eval

    if state.unfrozen_through < epoch:
        newly = apply_unfreeze_schedule(parts.model, run.recipe, epoch)
        state.unfrozen_through = epoch
        if newly:
            parts.net = run.placement.prepare_model(parts.model)  # DDP must learn the new trainable set
            run.progress.note(f"epoch {epoch + 1}: unfroze {len(newly)} parameters")
    if cache is not None and not cache.covers(epoch):
        cache = None
        if run.placement.is_main:
            features.drop(run.run_dir)
        run.progress.note(f"epoch {epoch + 1}: feature cache dropped (train.unfreeze_at unfroze part of the backbone)")
    parts.net.train()
    set_frozen_batchnorm_eval(parts.model, run.recipe)
    run.data.sampler.set_epoch(epoch, skip=state.batch)
    run.progress.start_epoch(epoch, run.budget.epochs, run.budget.batches, done=state.batch)
    return cache


def _train_epoch(
    run: Run, batches: Iterator[Any], state: TrainState, parts: TrainingParts, checkpointer: Checkpointer, gpu: GpuStats
) -> None:
    """Optimizer steps from `state.batch` until the epoch or the step budget ends: each one logged
    every `monitor.log_every_steps`, and checkpointed every `train.checkpoint.every_steps` when
    that falls inside the epoch (its end saves anyway)."""
    recipe, budget, progress, precision = run.recipe, run.budget, run.progress, run.recipe.train.precision
    window = LogWindow.on(run.placement.device)
    shown: dict[str, float] = {}
    for group in groups(batches, state.batch, budget.batches, recipe.train.accumulate):
        buffers = floating_buffers(parts.model)
        loss_sum, samples = train_step(
            parts.net,
            parts.model,
            group,
            state,
            recipe,
            run.placement,
            parts.scaler,
            parts.optimizer,
            run.monitor,
            progress,
        )
        grad_norm = clip_gradients(parts.model, parts.optimizer, parts.scaler, recipe.train.clip_grad_norm)
        bad = nonfinite_part(loss_sum, grad_norm, run.placement, precision=precision, scale=parts.scaler.get_scale())
        if bad is None:
            window.add(loss_sum, len(group), samples)
            parts.scaler.step(parts.optimizer)  # fp16: GradScaler itself skips a step whose gradients overflowed
            state.nonfinite_in_a_row = 0
        else:  # skipped: the weights, optimizer state and BatchNorm statistics stay as they were
            restore_buffers(buffers)
            count_nonfinite(state, bad, precision, progress, run.monitor)
        parts.scaler.update()
        log = (state.step + 1) % recipe.monitor.log_every_steps == 0
        state.step += 1
        state.batch += len(group)
        at_end, out_of_steps = state.batch >= budget.batches, state.step >= budget.steps
        if run.placement.is_main and (at_end or out_of_steps):
            run.monitor.histograms(parts.model, state.step)  # once per epoch, while the gradients exist
        parts.optimizer.zero_grad(set_to_none=True)
        parts.scheduler.step()
        if log:
            shown = _log_step(run, state, window, parts.optimizer, grad_norm, gpu)
        elif progress.mode == "rich":
            progress.update(state.batch, shown, window.throughput(), log=False)
        if shown:
            state.metrics["train/loss"] = shown["train/loss"]
        every = recipe.train.checkpoint.every_steps
        if every and state.step % every == 0 and not (at_end or out_of_steps):
            checkpointer.save(state, evaluated=False)  # resumable, but not ranked: nothing evaluated it
        if out_of_steps:
            break


def _log_step(
    run: Run, state: TrainState, window: LogWindow, optimizer: Any, grad_norm: torch.Tensor | None, gpu: GpuStats
) -> dict[str, float]:
    """Log the training scalars of the window that ends at this step; the values the progress shows."""
    device = run.placement.device
    throughput = window.throughput()
    shown = {"train/loss": window.mean_loss()} if window.batches else {}  # every step skipped: no loss to show
    scalars = {**shown, "train/samples_per_s": throughput, **learning_rates(optimizer), **memory_scalars(device)}
    if grad_norm is not None:
        scalars["train/grad_norm"] = float(grad_norm)
    scalars.update(gpu.scalars())
    run.monitor.scalars(state.step, scalars, epoch=state.epoch)
    window.reset()
    run.progress.update(state.batch, shown, throughput, log=True)
    return shown


def _epoch_scalars(seconds: float, peak_memory: PeakMemory, planned: int | None) -> dict[str, float]:
    scalars = {"time/epoch_s": seconds, "system/peak_mib": peak_memory.peak() / 2**20}
    if planned is not None:
        scalars["system/plan_estimate_mib"] = planned / 2**20
    return scalars


def _end_epoch(
    run: Run,
    epoch: int,
    state: TrainState,
    parts: TrainingParts,
    cache: FeatureCache | None,
    checkpointer: Checkpointer,
    reporter: Reporter,
    epoch_scalars: dict[str, float],
) -> bool:
    """The end of an epoch (or of the step budget): validate when due, checkpoint, report the
    evaluated epoch; True when the run is done (last epoch, step budget spent, or stopped early)."""
    recipe, budget = run.recipe, run.budget
    last_epoch = state.epoch + 1 >= budget.epochs or state.step >= budget.steps
    evaluated = (epoch + 1) % recipe.train.eval_every_epochs == 0 or last_epoch
    if run.placement.is_main:
        run.monitor.scalars(state.step, epoch_scalars, epoch=epoch)
    if evaluated:
        validate(
            epoch, state, parts.net, parts.model, run.data, recipe, run.placement, cache, run.monitor, run.progress
        )
    run.progress.end_epoch({k: v for k, v in state.metrics.items() if k.startswith("val/")} if evaluated else {})
    state.epoch, state.batch = epoch + 1, 0
    done = last_epoch or state.stopped_early
    checkpoint = checkpointer.save(state, evaluated=evaluated) if recipe.train.checkpoint.every_epoch or done else None
    if evaluated:
        reporter.report(epoch, dict(state.metrics), checkpoint)
    return done


# --------------------------------------------------------------------------- summary


def _measured(
    elapsed: float, epoch_scalars: dict[str, float], memory_kind: str, planned: int | None, *, cached: bool
) -> dict[str, Any]:
    """The summary's measured rows: time, the last epoch's peak memory against the plan's estimate,
    and whether the feature cache was used."""
    rows: dict[str, Any] = {
        "time (s)": round(elapsed, 1),
        f"peak memory, last epoch (MiB, {memory_kind})": round(epoch_scalars["system/peak_mib"], 1),
    }
    if planned is not None:
        rows["surgery plan's estimate (MiB)"] = round(planned / 2**20, 1)
    rows["feature cache"] = "used" if cached else "not used"
    return rows


def _summary_rows(
    recipe: Recipe, state: TrainState, data: TrainingData, best: Path | None, measured: dict[str, Any]
) -> dict[str, Any]:
    """The run summary table: final metrics, progress, what was `measured`, and what went unusual."""
    rows: dict[str, Any] = dict(sorted(state.metrics.items()))
    rows.update({"epochs": state.epoch, "steps": state.step, "stopped early": state.stopped_early, **measured})
    if state.nonfinite_steps:
        rows["skipped steps (non-finite loss or gradients)"] = state.nonfinite_steps
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
