"""`surgery doctor`: what this machine offers a run (versions, devices, hubs, caches)."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from surgery.versions import package_version

HUBS = ("https://huggingface.co", "https://download.pytorch.org")
PACKAGES = ("torch", "torchvision", "timm", "transformers", "ray", "safetensors", "onnxruntime")


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _folder_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except OSError:
                continue
    return total


def version_lines() -> list[str]:
    import torch

    lines = [f"python        {platform.python_version()} ({platform.platform()})"]
    lines += [f"{p:<13} {package_version(p)}" for p in PACKAGES]
    lines.append(f"cuda          {torch.version.cuda or 'none'} (available: {torch.cuda.is_available()})")
    return lines


def device_lines() -> list[str]:
    import psutil
    import torch

    lines = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            name = torch.cuda.get_device_name(i)
            lines.append(f"cuda:{i}        {name}: {_gib(total - free)} used, {_gib(free)} free of {_gib(total)}")
    memory = psutil.virtual_memory()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines.append(
        f"cpu           {cpus} cores usable; RAM {_gib(memory.total - memory.available)} used, {_gib(memory.available)} free of {_gib(memory.total)}"
    )
    if not torch.cuda.is_available():
        lines.append("gpu           none (training runs on CPU)")
    return lines


def _reachable(url: str, timeout: float) -> bool:
    # A real HTTPS request: a bare TCP connect succeeds through some sandboxes' black holes.
    import httpx

    try:
        httpx.head(url, timeout=timeout)
        return True
    except Exception:
        return False


def hub_lines(timeout: float = 1.0) -> list[str]:
    """Reachability of the model hubs; all probes run at once, about `timeout` seconds in total."""
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "TRUE", "yes"):
        return ["hubs          offline (HF_HUB_OFFLINE=1): only cached or local weights load"]
    start = time.perf_counter()
    pool = ThreadPoolExecutor(len(HUBS))
    futures = {url: pool.submit(_reachable, url, timeout) for url in HUBS}
    results = {}
    for url, future in futures.items():
        try:
            results[url] = future.result(timeout=max(0.1, timeout + 0.5 - (time.perf_counter() - start)))
        except Exception:
            results[url] = False
    pool.shutdown(wait=False, cancel_futures=True)
    elapsed = time.perf_counter() - start
    lines = [f"hub           {url}: {'reachable' if ok else 'unreachable'}" for url, ok in results.items()]
    if not any(results.values()):
        lines.append(
            f"hubs          offline ({elapsed:.1f}s probe): use local `weights:` files or set HF_HUB_OFFLINE=1"
        )
    return lines


def cache_dirs() -> dict[str, Path]:
    home = Path.home()
    hf_home = Path(os.environ.get("HF_HOME", home / ".cache" / "huggingface"))
    hub = Path(os.environ.get("HF_HUB_CACHE", os.environ.get("HUGGINGFACE_HUB_CACHE", hf_home / "hub")))
    try:
        import torch.hub

        torch_hub = Path(torch.hub.get_dir())
    except Exception:
        torch_hub = home / ".cache" / "torch" / "hub"
    return {"huggingface": hub, "torch hub": torch_hub, "timm": hub}


def cache_lines() -> list[str]:
    lines = []
    for name, path in cache_dirs().items():
        if name == "timm":
            lines.append(f"cache {name:<11} shares the Hugging Face hub cache ({path})")
            continue
        size = _gib(_folder_size(path)) if path.is_dir() else "absent"
        lines.append(f"cache {name:<11} {path} ({size})")
    return lines


def doctor_report(serving: Sequence[str] = ()) -> str:
    """Versions, devices and memory, hub reachability, cache locations and sizes; `serving` lines
    (from `serve/`, which the command line asks: nothing in `surgery/` imports serving) follow."""
    sections = [
        ("versions", version_lines()),
        ("devices", device_lines()),
        ("hubs", hub_lines()),
        ("caches", cache_lines()),
    ]
    if serving:
        sections.append(("serving", list(serving)))
    return "\n".join(f"[{title}]\n" + "\n".join(lines) for title, lines in sections) + "\n"
