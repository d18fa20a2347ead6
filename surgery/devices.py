"""Devices: `placement.device` (and a stage's `device`) → a torch device this machine has.

Asking for a device the machine lacks is an error naming what it has, never a silent fallback to
another device."""

from __future__ import annotations

import torch

from surgery.errors import SurgeryError


def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    """`placement.device` → a torch device; `auto` is CUDA (this process's local rank) if present,
    else CPU. Asking for a device this machine lacks is an error, never a silent fallback."""
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SurgeryError(f"placement.device is {setting!r} but CUDA is not available here; use `auto` or `cpu`")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        elif device.index >= torch.cuda.device_count():
            raise SurgeryError(
                f"placement.device is {setting!r} but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SurgeryError("placement.device is 'mps' but MPS is not available here; use `auto` or `cpu`")
    return device


def resolve_device_kind(setting: str) -> str:
    """`cuda` or `cpu` for a ddp worker (`auto`: CUDA when this machine, the driver, has it)."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting.split(":")[0]
