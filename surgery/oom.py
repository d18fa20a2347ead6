"""Out-of-memory recovery: when a training step runs out of device memory, split each loaded batch
into more, smaller micro-batches and retry the same step, keeping the effective batch (and so the
learning rate) unchanged.

The data loader keeps loading `data.batch_size` batches in the order it always does (so data order,
resume positions and checkpoints are unaffected); the *split* — how many micro-batches each loaded
batch is cut into — is run state: saved in every checkpoint and honoured on resume. A split of s
trains exactly as a run started with `batch_size / s` and `accumulate × s` would: each piece's
loss is weighted by its share of the batch, so the summed gradient is the same.

Under several ranks every rank must agree on the split, or the gradient all-reduce would pair
different calls: each step attempt, every rank says whether it ran out of memory
(`placement.all_reduce`, before the backward that synchronises gradients), and if any did, all
retry with the same, larger split. An out-of-memory error inside that synchronising backward
can't be coordinated and stops the run with the same advice as micro-batch 1.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Mapping
from typing import Any

import torch

from surgery.errors import SurgeryError


def pieces(
    inputs: Any, targets: Mapping[str, torch.Tensor], split: int
) -> list[tuple[Any, dict[str, torch.Tensor], float]]:
    """Cut one loaded batch into at most `split` micro-batches of ⌈n/split⌉ samples:
    (inputs, targets, share of the batch) each. `inputs` is a tuple of tensors, or a dict (cached
    head inputs)."""
    n = batch_size(targets)
    if split <= 1:
        return [(inputs, dict(targets), 1.0)]
    size = math.ceil(n / split)
    chunks: list[tuple[Any, dict[str, torch.Tensor], float]] = []
    for start in range(0, n, size):
        stop = min(n, start + size)
        part = (
            {k: v[start:stop] for k, v in inputs.items()}
            if isinstance(inputs, dict)
            else tuple(t[start:stop] for t in inputs)
        )
        chunks.append((part, {k: v[start:stop] for k, v in targets.items()}, (stop - start) / n))
    return chunks


def batch_size(targets: Mapping[str, torch.Tensor]) -> int:
    return int(next(iter(targets.values())).shape[0])


def free_memory(device: torch.device, optimizer: Any = None) -> None:
    """Drop this step's gradients and whatever the failed attempt left, and give cached blocks back
    to the device (call outside the `except` block, once the traceback's frames are gone)."""
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def next_split(split: int, batch: int, *, device: torch.device, step: int, error: str) -> int:
    """The split after an out-of-memory error at `split`; an error when micro-batches are already
    one sample."""
    if math.ceil(batch / split) <= 1:
        raise SurgeryError(
            f"out of memory on {device} at step {step + 1} even with micro-batches of 1 sample "
            f"(data.batch_size {batch} split {split} ways): the model does not fit this device. "
            "Freeze more of it (`freeze:`), use `train.precision: bf16`, a smaller input (`input.size`, "
            f"`input.max_length`), or a device with more memory. ({error.splitlines()[0][:200]})"
        )
    return split * 2


def unrecoverable(device: torch.device, step: int, error: str) -> SurgeryError:
    return SurgeryError(
        f"out of memory on {device} at step {step + 1} during the backward that synchronises gradients across "
        "ranks, which the ranks cannot agree to retry: lower data.batch_size and raise train.accumulate (same "
        f"effective batch), or free memory as for any out-of-memory error. ({error.splitlines()[0][:200]})"
    )


class PeerOutOfMemory(Exception):
    """Another rank ran out of memory in this step: every rank retries it with a finer split."""


def any_rank(placement: Any, failed: bool) -> bool:
    """Whether any rank ran out of memory in this step attempt (every rank calls it once per attempt)."""
    if placement.world_size == 1:
        return failed
    return placement.all_reduce({"oom": float(failed)})["oom"] > 0
