"""Provenance: where a run's recipe and weights came from, for the header of `recipe.lock.yaml`.
The recipe loader hangs a `Provenance` (every file of the `extends` chain, as resolved) on each
recipe it loads; `provenance_lines` adds the hashes of the pretrained weights the build used
(from the zoo's cache, or inside a package). Torch and the zoos are imported only to find a
cached weights file, after a build has imported them anyway.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from surgery.files import sha256_file
from surgery.places import package_model_folder


class Provenance(list):  # type: ignore[type-arg]
    """Where each file of a recipe's `extends` chain came from (the recipe first). Rides on the
    loaded `Recipe` as a private attribute; it is not part of what the recipe *is*, so two recipes
    with the same fields compare equal whatever their provenance."""

    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = None  # type: ignore[assignment]


_PACKAGE = "package:"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def provenance_lines(recipe: Any) -> list[str]:
    """`recipe.lock.yaml` header lines: every recipe of the `extends` chain (source, version,
    sha256), where the pretrained weights came from, and the hashes of the weights a package
    ships or the zoo cached."""
    chain = getattr(recipe, "_provenance", None) or []
    lines = [f"# {'recipe' if i == 0 else 'extends'}: {item.line()}" for i, item in enumerate(chain)]
    return lines + _origin_lines(recipe.backbone) + _package_weight_lines(recipe) + _zoo_weight_lines(recipe.backbone)


def _origin_lines(backbone: Any) -> list[str]:
    """Where pretrained weights came from, in words (their hashes follow in `# weights:` lines)."""
    if not backbone.pretrained:
        return []
    what = f"{backbone.source} {backbone.name}"
    if backbone.weights:
        return [f"# pretrained: {what} from the weights {backbone.weights}"]
    if backbone.source == "transformers" and backbone.name.startswith(_PACKAGE):
        return [f"# pretrained: {what} from the model folder its package ships"]
    if backbone.source == "transformers" and Path(backbone.name).expanduser().is_dir():
        return [f"# pretrained: {what} from the model folder {backbone.name}"]
    return [f"# pretrained: {what} from the zoo's hub/cache"]


def _package_weight_lines(recipe: Any) -> list[str]:
    """The sha256 of each weights file in the model folder a `package:` backbone names (the folder
    holding the package's shallowest config.json, as the build finds it), read from disk: a
    package whose file list (RECORD) omits its weights is still hashed, and none found says so."""
    backbone = recipe.backbone
    if not (backbone.pretrained and backbone.source == "transformers" and backbone.name.startswith(_PACKAGE)):
        return []
    from importlib import metadata

    distribution = backbone.name[len(_PACKAGE) :]
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return [f"# weights: package {distribution} is not installed here, so not hashed"]
    folder = package_model_folder(dist)
    files = [folder / name for name in _WEIGHT_FILES if folder is not None and (folder / name).is_file()]
    if not files:
        return [f"# weights: package {distribution} {dist.version}: no weights file found, so not hashed"]
    root = Path(str(dist.locate_file("")))
    return [
        f"# weights: package {distribution} {dist.version} {_relative(file, root)} sha256:{sha256_file(file)}"
        for file in files
    ]


def _relative(file: Path, root: Path) -> str:
    try:
        return file.relative_to(root).as_posix()
    except ValueError:
        return str(file)


def _zoo_weight_lines(backbone: Any) -> list[str]:
    """The hash of the zoo's cached weights file a pretrained backbone was loaded from (after
    the build, so the file is in the cache)."""
    if not backbone.pretrained or backbone.weights or backbone.name.startswith(_PACKAGE):
        return []
    try:
        file = _zoo_cache_file(backbone)
    except Exception:  # provenance must never fail a run; say what is unknown instead
        file = None
    what = f"{backbone.source} {backbone.name}"
    if file is None or not file.is_file():
        return [f"# weights: {what} from the zoo's hub/cache (cached file not found, so not hashed)"]
    return [f"# weights: {what} {file} sha256:{sha256_file(file)}"]


def _zoo_cache_file(backbone: Any) -> Path | None:
    if backbone.source == "torchvision":
        import torch
        import torchvision

        weights = torchvision.models.get_model_weights(backbone.name).DEFAULT
        return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    from huggingface_hub import try_to_load_from_cache

    if backbone.source == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(backbone.name)
        if cfg is None or not cfg.hf_hub_id:
            return None
        repo, revision = cfg.hf_hub_id, None
    elif Path(backbone.name).expanduser().is_dir():
        folder = Path(backbone.name).expanduser()
        return next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()), None)
    else:
        repo, revision = backbone.name, backbone.revision
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename, revision=revision)
        if isinstance(found, str):
            return Path(found)
    return None


__all__ = ["Provenance", "provenance_lines"]
