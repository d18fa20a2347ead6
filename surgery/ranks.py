"""What training code asks of a placement, as protocols, so `data` and `fit` type against the
questions they ask instead of importing a strategy (the implementations live in
`surgery.strategies` and `surgery.pipeline`; `surgery.placement` chooses one).

`Rank` is what loading data needs (its device, and which shard of each epoch is this rank's);
`Placement` is the whole object `fit` talks to."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn


class Rank(Protocol):
    """This process's place in a run: the device it computes on, its rank and the number of ranks."""

    device: torch.device
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the run folder."""
        ...


class Placement(Rank, Protocol):
    """The object `fit` talks to: one implementation per strategy (single device, DDP, Ray Train,
    pipeline stages); `fit` never asks which."""

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def unwrap(self, model: nn.Module) -> Any: ...

    def no_sync(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager[Any]: ...

    def all_reduce(self, values: Mapping[str, float], weight: float = 1.0) -> dict[str, float]: ...

    def barrier(self) -> None: ...

    def parameter_devices(self, model: nn.Module) -> dict[str, str]: ...

    def close(self) -> None: ...
