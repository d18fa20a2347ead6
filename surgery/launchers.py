"""Launchers: how `surgery build` runs the training function it is given, where the recipe's
placement says: in this process, or as `workers` local ddp processes. (Ray Train is
`surgery.ray_train`'s; `surgery.placement.launcher_for` chooses.)

A launcher receives the function it runs — `launch(function, recipe, run_dir, resume=, force=)`
calls `function(recipe, run_dir, resume=, force=, placement=)` once per rank, with that rank's
placement — and imports no training code, so the commands that own `fit` (`build`, `tune`) hand
it down and nothing below them imports it back (Lightning Fabric's `strategies/launchers`). The
function must pickle by reference (a module-level function such as `surgery.train.fit`): spawned
ddp processes and Ray Train workers import it by name.

Each launcher also says which process makes the run folder (`on_main`: rank 0 under `torchrun`,
else this one) and whether this process exports (`is_main`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from surgery.errors import SurgeryError
from surgery.quiet import ELASTIC_LOG, loggers_to
from surgery.ranks import Placement
from surgery.report import Reporter
from surgery.schema import Recipe
from surgery.strategies import DistributedDataParallel

T = TypeVar("T")

ELASTIC_LOGGERS = ("torch.distributed.elastic", "torch.multiprocessing")  # the agent's and spawn's reports


class Fit(Protocol):
    """The training function a launcher runs on every rank: `surgery.train.fit`."""

    def __call__(
        self,
        recipe: Recipe,
        run_dir: Path,
        *,
        resume: bool = ...,
        force: bool = ...,
        placement: Placement | None = ...,
        reporter: Reporter | None = ...,
    ) -> Any: ...


class InProcess:
    """`function` in this process: one device, a pipeline, or one rank under `torchrun`."""

    def __init__(self, placement: Placement) -> None:
        self.placement = placement

    @property
    def is_main(self) -> bool:
        return self.placement.is_main

    def on_main(self, make: Callable[[], T]) -> T:
        on_main = getattr(self.placement, "on_main", None)
        return on_main(make) if on_main else make()

    def launch(self, function: Fit, recipe: Recipe, run_dir: Path, *, resume: bool, force: bool) -> None:
        function(recipe, run_dir, resume=resume, force=force, placement=self.placement)

    def close(self) -> None:
        self.placement.close()


class LocalProcesses:
    """`ddp` on this machine: `workers` processes started by torch's elastic launcher (what
    `torchrun` runs), each calling `function` as one rank; a worker that dies takes the others
    down (`surgery build --resume` continues from the last checkpoint)."""

    is_main = True

    def __init__(self, recipe: Recipe) -> None:
        self.workers = recipe.placement.workers

    def on_main(self, make: Callable[[], T]) -> T:
        return make()

    def launch(self, function: Fit, recipe: Recipe, run_dir: Path, *, resume: bool, force: bool) -> None:
        import uuid

        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.launcher.api import LaunchConfig, elastic_launch

        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=self.workers,
            run_id=str(uuid.uuid4()),
            rdzv_backend="c10d",
            rdzv_endpoint="127.0.0.1:0",
            max_restarts=0,  # restarting a killed group hung in our tests: Ray Train does restarts
            monitor_interval=0.1,
            start_method="spawn",
            local_addr="127.0.0.1",
        )
        try:
            with loggers_to(Path(run_dir) / ELASTIC_LOG, ELASTIC_LOGGERS):  # the launcher's one line says it
                elastic_launch(config, _local_worker)(function, recipe, str(run_dir), resume, force)
        except ChildFailedError as exc:
            raise SurgeryError(_first_failure(exc)) from None

    def close(self) -> None:
        pass


def _first_failure(exc: Any) -> str:
    rank, failure = min(exc.failures.items(), key=lambda item: item[1].timestamp)
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", message)
    text = str(message).strip().splitlines()
    line = text[0] if text else f"exit code {failure.exitcode}"
    return f"ddp worker {rank} failed: {line}"


def _local_worker(function: Fit, recipe: Recipe, run_dir: str, resume: bool, force: bool) -> None:
    """One local ddp rank (a spawned process): join the group, run `function`, leave."""
    from torch.distributed.elastic.multiprocessing.errors import record

    try:
        record(_local_rank)(function, recipe, run_dir, resume, force)
    except SurgeryError:
        raise SystemExit(1) from None  # recorded for the launcher's one-line error; no traceback here


def _local_rank(function: Fit, recipe: Recipe, run_dir: str, resume: bool, force: bool) -> None:
    placement = DistributedDataParallel.from_env(recipe)
    try:
        function(recipe, Path(run_dir), resume=resume, force=force, placement=placement)
    finally:
        placement.close()
