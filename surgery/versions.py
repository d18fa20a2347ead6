"""Versions of what made a run or a bundle: recorded in lock files and manifests, shown by
`surgery doctor`. No torch."""

from __future__ import annotations

import importlib.metadata
import platform

# What a run's lock file and a bundle's manifest record (what made the weights and the formats).
RECORDED_PACKAGES = (
    "surgery",
    "torch",
    "torchvision",
    "timm",
    "transformers",
    "safetensors",
    "numpy",
    "peft",
    "onnx",
    "onnxruntime",
    "onnxscript",
)


def package_version(package: str) -> str:
    """An installed distribution's version, or "not installed"."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def package_versions() -> dict[str, str]:
    """Python's and the installed `RECORDED_PACKAGES`' versions (for lock files and manifests)."""
    versions = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        version = package_version(name)
        if version != "not installed":
            versions[name] = version
    return versions
