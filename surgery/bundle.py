"""Bundles on disk: the manifest, the file hashes, and loading a bundle back into a model.

A bundle is a folder a tool that has never heard of `surgery` can use (`model.onnx` needs only
onnxruntime; `model.safetensors` plus `manifest.json` describe the weights and the inputs), and
that `load_bundle` turns back into a `SurgicalModel` without the network: the architecture comes
from the bundled resolved recipe, the weights from `model.safetensors`, a transformers
backbone's config and tokenizer from the bundle's own folders. Nothing in a bundle is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from surgery.errors import BundleError
from surgery.files import sha256_file
from surgery.inputs import InputSpec

BUNDLE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
RECIPE = "recipe.yaml"
TOKENIZER_DIR = "tokenizer"  # tokenizer files, and a transformers backbone's config.json (no weights)


def hash_files(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` except the manifest, keyed by POSIX relative path."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST
    }


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the bundle at `path`, checked for a known format version (not the hashes)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"{path}: not a bundle folder (no such directory)")
    if not manifest_path.is_file():
        raise BundleError(f"{path}: not a bundle (no {MANIFEST}); export one with `surgery export`")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(
            f"{manifest_path}: unreadable manifest ({err}); the bundle is damaged, export it again"
        ) from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path}: manifest is not a JSON object; the bundle is damaged, export it again")
    version = manifest.get("format_version")
    if version != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path}: unknown bundle format_version {version!r} (this surgery reads {BUNDLE_FORMAT_VERSION}); "
            "use the surgery version that wrote it, or export the run again"
        )
    return manifest


def verify_files(path: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists exists inside the bundle and has its recorded sha256."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{path / MANIFEST}: manifest lists no files; the bundle is damaged, export it again")
    for required in (WEIGHTS, RECIPE):
        if required not in files:
            raise BundleError(
                f"{path / MANIFEST}: manifest does not list {required}; the bundle is damaged, export it again"
            )
    for rel, expected in files.items():
        parts = PurePosixPath(rel).parts
        if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
            raise BundleError(f"{path / MANIFEST}: file entry {rel!r} points outside the bundle")
        file = path.joinpath(*parts)
        if not file.is_file():
            raise BundleError(f"{file}: listed in the manifest but missing; the bundle is incomplete, export it again")
        actual = sha256_file(file)
        if actual != expected:
            raise BundleError(
                f"{file}: sha256 mismatch (manifest {str(expected)[:12]}…, file {actual[:12]}…); "
                "the file was modified or truncated, export the bundle again"
            )


@dataclass
class LoadedBundle:
    """A bundle loaded back: the model (eval mode, on CPU) and what serving needs around it."""

    path: Path
    model: Any  # surgery.model.SurgicalModel
    manifest: dict[str, Any]
    recipe: Any  # surgery.schema.Recipe (as trained, before the load-time rewrites)
    input_spec: InputSpec
    tokenizer: Any  # a transformers tokenizer for text models, else None

    @property
    def labels(self) -> dict[str, list[str] | None]:
        return {head["name"]: head.get("labels") for head in self.manifest["heads"]}


def _recipe_for_loading(recipe: Any, path: Path, manifest: dict[str, Any]) -> Any:
    """The recipe that rebuilds the bundled architecture offline, with no weights read.

    LoRA adapters were merged into the base weights on export, so the rebuilt model has none;
    freeze rules only matter to training (and may name adapter parameters that no longer exist);
    a transformers backbone's config comes from the bundle instead of the hub or the training
    machine's disk.
    """
    rebuilt = recipe.model_copy(deep=True)
    if manifest.get("lora_merged"):
        rebuilt.surgery = [op for op in rebuilt.surgery if op.lora is None]
    rebuilt.freeze = []
    rebuilt.unfreeze = []
    rebuilt.train.unfreeze_at = []
    backbone = rebuilt.backbone
    backbone.pretrained = False
    backbone.sha256 = None
    backbone.weights = None
    if backbone.source == "transformers":
        if not (path / TOKENIZER_DIR / "config.json").is_file():
            raise BundleError(f"{path}: transformers bundle without {TOKENIZER_DIR}/config.json; export it again")
        backbone.name = str(path / TOKENIZER_DIR)
        backbone.revision = None
    return rebuilt


def load_bundle(path: Path) -> LoadedBundle:
    """Verify and load a bundle: every sha256 checked, the model rebuilt from the bundled recipe
    with no network access, weights loaded strictly from `model.safetensors`, eval mode."""
    from surgery.model import build_model
    from surgery.recipe import load_recipe_text, recipe_hash

    path = Path(path).resolve()
    manifest = read_manifest(path)
    verify_files(path, manifest)
    recipe_file = path / RECIPE
    recipe = load_recipe_text(recipe_file.read_text(encoding="utf-8"), filename=str(recipe_file), base_dir=path)
    if manifest.get("recipe_sha256") not in (None, recipe_hash(recipe)):
        raise BundleError(
            f"{recipe_file}: does not match the manifest's recipe_sha256; the bundle is damaged, export it again"
        )
    model = build_model(_recipe_for_loading(recipe, path, manifest), load_weights=False)
    try:
        load_weights(model, path / WEIGHTS)
    except ValueError as err:
        raise BundleError(f"{path / WEIGHTS}: {err}") from None
    model.eval()
    spec = InputSpec.from_dict(manifest["input"])
    tokenizer = None
    if (path / TOKENIZER_DIR).is_dir():
        spec.tokenizer = str(path / TOKENIZER_DIR)
        tokenizer = getattr(model, "tokenizer", None) or _load_tokenizer(path / TOKENIZER_DIR)
    return LoadedBundle(path=path, model=model, manifest=manifest, recipe=recipe, input_spec=spec, tokenizer=tokenizer)


def load_weights(model: Any, file: Path) -> None:
    """Load a safetensors state dict into `model`, every tensor accounted for. Tied tensors may be
    stored once (as safetensors' `save_model` writes them) or under each of their names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"unreadable safetensors file ({err})") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"weights do not fit the model: {str(err).splitlines()[-1].strip()}") from None
    own = model.state_dict(keep_vars=True)
    loaded_storage = {_storage_key(own[k]) for k in state if k in own}
    missing = [k for k in missing if _storage_key(own[k]) not in loaded_storage]
    if missing or unexpected:
        raise ValueError(
            f"weights do not fit the model (missing: {', '.join(missing[:5]) or 'none'}; "
            f"unexpected: {', '.join(unexpected[:5]) or 'none'})"
        )


def _storage_key(tensor: Any) -> tuple[int, int, tuple[int, ...]]:
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise BundleError(f"{folder}: cannot load the bundled tokenizer: {err}") from None
