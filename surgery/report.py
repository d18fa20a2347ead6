"""Reporting: where `fit` hands each evaluated epoch, as a callback it is given.

Reporting belongs to whoever launched the run, not to the device strategy: nothing when a run is
launched locally, Ray Train's `ray.train.report` on a Ray Train worker, Ray Tune's `tune.report`
in a trial. `fit` calls `reporter.report(...)` once per evaluated epoch and never asks which."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol


class Reporter(Protocol):
    """What `fit` is given to hand an evaluated epoch to its launcher."""

    def report(self, epoch: int, metrics: Mapping[str, float], checkpoint: Path | None) -> None:
        """`epoch` (0-based) was evaluated with `metrics`; `checkpoint` is the folder saved at its
        end (rank 0 knows it; other ranks pass None), or None when the epoch saved none."""


class NoReport:
    """A run launched locally: nobody to report to."""

    def report(self, epoch: int, metrics: Mapping[str, float], checkpoint: Path | None) -> None:
        pass
