"""Training memory as measured (`surgery.plan.planned_bytes` is the estimate `fit` logs beside it).

Per epoch: on CUDA the allocator's peak (`max_memory_allocated`, reset at each epoch's start); on
a CPU the process's peak resident memory (Linux `VmHWM`, reset through `/proc/self/clear_refs`)
minus what the process held before the model was built (and what loading the data added), so
weights, gradients, optimizer state, activations and the allocator's slack count. GPU utilisation and memory come from NVIDIA's
management library (`nvidia-ml-py`) when CUDA is present.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def process_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class PeakMemory:
    """The peak training memory of each epoch (bytes): `start()` at an epoch's start, `peak()` at its end."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = 0 if device.type == "cuda" else process_rss()
        self.kind = "cuda max allocated" if device.type == "cuda" else "process peak RSS growth"

    @contextlib.contextmanager
    def excluding(self) -> Iterator[None]:
        """Leave out of the CPU figure what the block keeps resident (the data set held in memory)."""
        before = process_rss() if self.device.type != "cuda" else 0
        yield
        if self.device.type != "cuda":
            self.baseline += max(0, process_rss() - before)

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError):  # "5" resets the peak resident set size (Linux ≥ 4.0)
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        high = _status_kib("VmHWM")
        peak = high * 1024 if high is not None else process_rss()
        return max(0, peak - self.baseline)


class GpuStats:
    """GPU utilisation (%) and memory used (MiB) of this process's device, through NVML; nothing
    when CUDA or `nvidia-ml-py` is absent."""

    def __init__(self, device: torch.device) -> None:
        self.handle: Any = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:  # no NVML library (not an NVIDIA driver), or the package is missing
            self.handle = None

    def scalars(self) -> dict[str, float]:
        if self.handle is None:
            return {}
        import pynvml

        try:
            rates = pynvml.nvmlDeviceGetUtilizationRates(self.handle)
            info = pynvml.nvmlDeviceGetMemoryInfo(self.handle)
        except Exception:
            return {}
        return {
            "system/gpu_utilisation_pct": float(rates.gpu),
            "system/gpu_memory_used_mib": info.used / 2**20,
        }
