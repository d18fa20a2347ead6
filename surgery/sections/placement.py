"""`placement:`: one device, data parallel (DDP), or pipeline stages."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field
from pydantic_core import PydanticCustomError

from surgery.sections.base import DEVICE_PATTERN, PositiveInt, Strict

_MODULE_PATH = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*"
_STAGE_ENTRY = rf"{_MODULE_PATH}(\.\.{_MODULE_PATH})?"


def _stage_entry(value: str) -> str:
    if not re.fullmatch(_STAGE_ENTRY, value):
        raise PydanticCustomError(
            "bad_stage_entry",
            "{msg}",
            {
                "msg": f"{value!r} is not a module path (`backbone.layer1`) or a range (`backbone.layer1..backbone.layer3`)"
            },
        )
    return value


def _strategy(value: Any) -> Any:
    if value == "data_parallel":
        raise PydanticCustomError(
            "refused_strategy",
            "data_parallel (single-process nn.DataParallel) is refused: `ddp` replaces it, with one process "
            "per device (no GIL contention between devices) and no gathering of every output and gradient "
            "on the first GPU (no memory imbalance); use `strategy: ddp` with `workers: N`",
        )
    return value


class Stage(Strict):
    """One pipeline stage: consecutive modules of the model, on one device."""

    modules: list[Annotated[str, AfterValidator(_stage_entry)]] = Field(
        min_length=1,
        description="Module paths of this stage in forward order, as `surgery plan` prints them: `backbone.conv1`, "
        "a range of sibling modules `backbone.layer1..backbone.layer3`, `heads`, or a parameter a split module "
        "owns directly (`backbone.pos_embed`).",
    )
    device: Annotated[str, Field(pattern=r"^(cpu|mps|cuda(:[0-9]+)?)$")] = Field(
        description="Device of the stage: `cuda:N`, `cpu` or `mps` (`auto` is not: a stage names its device)."
    )


class Placement(Strict):
    """Where the model runs: one device, data parallel (DDP) on local processes or Ray Train, or
    model-parallel pipeline stages."""

    strategy: Annotated[Literal["single", "ddp", "pipeline"], BeforeValidator(_strategy)] = Field(
        "single",
        description="`single` device, `ddp` (DistributedDataParallel over `workers` processes), or `pipeline` "
        "(model-parallel `stages`). `data_parallel` is refused: `ddp` replaces it.",
    )
    device: Annotated[str, Field(pattern=DEVICE_PATTERN)] = Field(
        "auto",
        description="`single`: `auto` (CUDA if present, else CPU), `cpu`, `cuda`, `cuda:N`, `mps`. "
        "`ddp`: `auto`, `cpu` (Gloo) or `cuda` (NCCL, one GPU per worker).",
    )
    workers: PositiveInt = Field(
        1, description="`ddp` processes (one per GPU; on CPU at most one per core). `data.batch_size` is per worker."
    )
    engine: Literal["local", "ray"] = Field(
        "local",
        description="Where `ddp` workers run: `local` processes launched by `surgery build` (or `torchrun`), or "
        "`ray`: Ray Train (on the cluster `RAY_ADDRESS` names, which also selects `ray` when set).",
    )
    max_failures: Annotated[int, Field(ge=0)] = Field(
        0,
        description="`ddp` with `engine: ray`: worker failures to survive; after one, Ray Train restarts all "
        "workers from the last checkpoint.",
    )
    stages: list[Stage] = Field(
        default_factory=list,
        description="`pipeline`: consecutive stages covering the model in forward order, each on a device.",
    )
    micro_batches: PositiveInt = Field(
        1,
        description="`pipeline`: split each batch into this many micro-batches so stages overlap (GPipe); "
        "gradients accumulate over them.",
    )
