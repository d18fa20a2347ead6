"""`ddp` on Ray Train: the launcher that runs the training function on Ray Train's `TorchTrainer`,
and the reporter that hands each evaluated epoch to Ray Train.

Like the local launchers it receives the function it runs (`train_on_ray(fit, recipe, run_dir)`)
and imports no training code; every worker calls it with a `RayTrainWorker` placement and a
`RayTrainReport` reporter. The run folder is the run's Ray storage, so the checkpoints Ray
registers are the run's own (never copied), and a restarted worker group continues from them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from surgery.cluster import cpu_count, ray_address, ray_is_connected, start_ray
from surgery.devices import resolve_device_kind
from surgery.errors import SurgeryError
from surgery.launchers import Fit
from surgery.quiet import RAY_LOG, ray_worker_output
from surgery.schema import Recipe
from surgery.strategies import RayTrainWorker

T = TypeVar("T")


class RayTrainReport:
    """The reporter of a Ray Train worker: every evaluated epoch goes to `ray.train.report`, with
    the checkpoint rank 0 saved in the run folder (Ray's storage: registered where it is, not
    uploaded), so Ray restarts a failed group from it and a Tune trial around it sees the epoch."""

    def report(self, epoch: int, metrics: Mapping[str, float], checkpoint: Path | None) -> None:
        import ray.train

        saved = ray.train.Checkpoint(str(checkpoint)) if checkpoint is not None else None
        ray.train.report(
            {**metrics, "epoch": epoch + 1},
            checkpoint=saved,
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
        )


class RayTrain:
    """`ddp` on Ray Train, as `surgery build` launches it: see `train_on_ray`. Ray is connected
    (and checked to hold the workers) before the run folder is made, and shut down by `close`
    when this launcher started it."""

    is_main = True

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.started_ray = False

    def on_main(self, make: Callable[[], T]) -> T:
        self.started_ray = connect_ray_train(self.recipe)
        return make()

    def launch(self, function: Fit, recipe: Recipe, run_dir: Path, *, resume: bool, force: bool) -> None:
        train_on_ray(function, recipe, run_dir, resume=resume, force=force)

    def close(self) -> None:
        if self.started_ray:
            import ray

            ray.shutdown()
            self.started_ray = False


def check_ray_train(recipe: Recipe) -> None:
    """Ray Train must be installed to run a recipe on it."""
    try:
        import ray.train
        import ray.train.torch  # noqa: F401
    except ImportError:
        raise SurgeryError(
            "placement.engine is 'ray' (or RAY_ADDRESS is set) but Ray Train is not installed; "
            "`pip install 'ray[train]'`, or use `engine: local`"
        ) from None


def _ray_worker(config: dict[str, Any]) -> None:
    """One Ray Train rank: the training function with a placement Ray set up and a reporter to
    Ray. Restarted after a worker failure, it continues from the last checkpoint (Ray's reported
    one, or a newer step checkpoint in the run folder)."""
    import logging

    import ray.train

    from surgery.runs import has_checkpoint

    # Ray Train logs each report at INFO through a logger named by its file, which the
    # LoggingConfig below does not reach: keep the workers' root logger to warnings.
    logging.getLogger().setLevel(logging.WARNING)
    run_dir = Path(config["run_dir"])
    restarted = ray.train.get_checkpoint() is not None or has_checkpoint(run_dir)
    config["function"](
        config["recipe"],
        run_dir,
        resume=config["resume"] or restarted,
        force=config["force"],
        placement=RayTrainWorker.from_context(),
        reporter=RayTrainReport(),
    )


def train_on_ray(
    function: Fit,
    recipe: Recipe,
    run_dir: Path,
    *,
    resume: bool = False,
    force: bool = False,
    callbacks: Sequence[Any] = (),
) -> Any:
    """Run `function` (`surgery.train.fit`) for `recipe` on Ray Train's `TorchTrainer`
    (`placement.workers` workers, one GPU each when the device is CUDA) into `run_dir`, which must
    already exist: it is the run's Ray storage (`storage_path` its parent, `name` its name), so
    Ray's checkpoints are the run's own. `placement.max_failures` restarts the workers from the
    last checkpoint after one dies.

    Uses the Ray this process is connected to, else `RAY_ADDRESS`'s cluster, else a local Ray
    (stopped again afterwards), started by `surgery.cluster.start_ray` with the workers' output
    shown. `callbacks` are Ray Train callbacks: Ray Tune passes a `TuneReportCallback` to receive
    every epoch's report. Returns Ray's `Result`; a failed run raises SurgeryError with the first
    error's message."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    placement = recipe.placement
    use_gpu = resolve_device_kind(placement.device) == "cuda"
    started = connect_ray_train(recipe)
    try:
        run_dir = Path(run_dir).resolve()
        _forget_ray_snapshot(run_dir)
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={
                "function": function,
                "recipe": recipe,
                "run_dir": str(run_dir),
                "resume": resume,
                "force": force,
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=placement.workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}
            ),
            run_config=ray.train.RunConfig(
                storage_path=str(run_dir.parent),
                name=run_dir.name,
                failure_config=ray.train.FailureConfig(max_failures=placement.max_failures),
                callbacks=list(callbacks) or None,
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # not each report, twice over
            ),
        )
        try:
            with ray_worker_output(run_dir / RAY_LOG, show="RayTrainWorker"):
                return trainer.fit()
        except ray.train.TrainingFailedError as exc:
            raise SurgeryError(f"Ray Train failed: {_ray_error_line(exc)}") from None
    finally:
        if started:
            ray.shutdown()


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints reported to it


def _forget_ray_snapshot(run_dir: Path) -> None:
    """Start Ray's record of reported checkpoints afresh for each launch. Our checkpoints (their
    index and `keep_best` rotation) are the run's record, and every launch resumes from them
    (`_ray_worker`); Ray's snapshot still lists checkpoints the rotation has since removed, and
    Ray refuses to start a run whose snapshot names a missing folder. Within one launch Ray
    restarts failed workers from its memory, never from this file."""
    (run_dir / RAY_SNAPSHOT).unlink(missing_ok=True)


def check_local_ray(recipe: Recipe) -> None:
    """Without RAY_ADDRESS the run gets a local Ray of this machine's CPUs (or GPUs): more
    workers than that are refused at once, without starting Ray to find out."""
    if ray_address() or ray_is_connected():
        return
    use_gpu = resolve_device_kind(recipe.placement.device) == "cuda"
    if use_gpu:
        import torch

        have = torch.cuda.device_count()
    else:
        have = cpu_count()
    _refuse_workers(recipe.placement.workers, have, "GPU" if use_gpu else "CPU", "this machine (a local Ray)")


def connect_ray_train(recipe: Recipe) -> bool:
    """Connect to Ray for a Ray Train run (`surgery.cluster.start_ray`, the workers' output shown)
    and check the cluster can hold `placement.workers`: one line, and Ray shut down again, when it
    cannot. True when this call started Ray (the caller shuts it down)."""
    check_ray_train(recipe)
    check_local_ray(recipe)
    import ray

    # Ray Train's print patch sends each print to a logger that prints it again: rank 0's lines twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    started = start_ray(worker_logs=True)
    try:
        use_gpu = resolve_device_kind(recipe.placement.device) == "cuda"
        kind = "GPU" if use_gpu else "CPU"
        have = int(ray.cluster_resources().get(kind, 0))
        _refuse_workers(recipe.placement.workers, have, kind, "the Ray cluster")
    except BaseException:
        if started:
            ray.shutdown()
        raise
    return started


def _refuse_workers(workers: int, have: int, kind: str, where: str) -> None:
    if workers > have:
        raise SurgeryError(
            f"placement.workers is {workers} but {where} has {have} {kind}(s); each Ray Train worker takes one "
            f"{kind}: use `--set placement.workers={max(have, 1)}`"
        )


def _ray_error_line(exc: BaseException) -> str:
    text = str(exc)
    for line in text.splitlines():
        if "SurgeryError" in line or "Error:" in line:
            return line.strip()
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__
