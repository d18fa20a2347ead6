"""Bundles on disk: the manifest, the file hashes, and loading a bundle back into a model.

A bundle is a folder a tool that has never heard of `surgery` can use (`model.onnx` needs only
onnxruntime; `model.safetensors` plus `manifest.json` describe the weights and the inputs), and
that `load_bundle` turns back into a `SurgicalModel` without the network: the architecture comes
from the bundled resolved recipe, the weights from `model.safetensors`, a transformers
backbone's config and tokenizer from the bundle's own folders. Nothing in a bundle is unpickled.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from surgery.content import read_safetensors_header
from surgery.errors import BundleError, RecipeError
from surgery.files import sha256_file
from surgery.inputs import InputSpec

BUNDLE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
RECIPE = "recipe.yaml"
TOKENIZER_DIR = "tokenizer"  # tokenizer files, and a transformers backbone's config.json (no weights)
ONNX = "model.onnx"
INT8_ONNX = "model.int8.onnx"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
# The file each exported format is written to (a manifest naming another file for one is refused).
FORMAT_FILES = {"safetensors": WEIGHTS, "onnx": "model.onnx", "torchscript": "model.ts", "pt2": "model.pt2"}
_SHA256 = r"^[0-9a-f]{64}$"
_IDENT = r"^[A-Za-z_][A-Za-z0-9_]*$"  # head names, as recipes allow them
_SLUG = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # model names, as recipes allow them: never a path
_REL_PATH = r"^[A-Za-z0-9_.-][A-Za-z0-9_./-]*$"


# --------------------------------------------------------------------------- the manifest schema


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Finite = Annotated[float, Field(allow_inf_nan=False)]


class ManifestInput(_Closed):
    """What the model takes (`surgery.inputs.InputSpec`)."""

    kind: Literal["image", "text", "vector"]
    channels: Annotated[int, Field(ge=0)]
    size: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=2, max_length=2)]
    mean: list[Finite]
    std: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]]
    interpolation: Annotated[str, Field(pattern=r"^[a-z_]+$")]
    crop_pct: Annotated[float, Field(gt=0, le=1)]
    tokenizer: Literal["tokenizer"] | None
    max_length: Annotated[int, Field(ge=1)]
    features: Annotated[int, Field(ge=0)]
    extra: dict[str, Any]

    @model_validator(mode="after")
    def _consistent(self) -> ManifestInput:
        if self.kind == "image":
            if self.channels not in (1, 3, 4):
                raise ValueError("an image input has 1, 3 or 4 channels")
            for name, values in (("mean", self.mean), ("std", self.std)):
                if len(values) not in (1, self.channels):
                    raise ValueError(f"{name} needs 1 or `channels` values")
        if self.kind == "vector" and self.features < 1:
            raise ValueError("a vector input has at least one feature")
        return self


class ManifestHead(_Closed):
    name: Annotated[str, Field(pattern=_IDENT)]
    task: Literal["multiclass", "binary", "multilabel", "regression"] | None
    labels: list[Annotated[str, Field(max_length=1000)]] | None
    out_features: Annotated[int, Field(ge=1)] | None
    output_shape: list[Annotated[int, Field(ge=0)] | Literal["batch", "sequence"]]


class ManifestFormat(BaseModel):
    """One exported format; exporters may note more about it (opset, dynamic shapes...)."""

    model_config = ConfigDict(extra="allow", strict=True)

    file: Annotated[str, Field(pattern=_REL_PATH)]
    max_abs_diff: Finite


class ManifestQuantizedHead(_Closed):
    """One head of the int8 model against the float one on the validation split. `metric` is the
    head's monitored metric (None, with its values, when the split has no targets for the head);
    `drop` is how much worse int8 is in that metric's units; `top1_match` is the share of rows
    whose predicted class (or 0/1 per label) agrees (None for regression)."""

    metric: Annotated[str, Field(pattern=r"^[a-z0-9_]+$")] | None
    float_onnx: Finite | None
    int8_onnx: Finite | None
    drop: Finite | None
    top1_match: Annotated[float, Field(ge=0, le=1)] | None
    max_abs_diff: Finite


class ManifestQuantized(_Closed):
    """A quantized model in the bundle and its parity gate: `passed` False means no runtime may
    use it (`reason` says why)."""

    file: Literal["model.int8.onnx"]  # runtimes open this name, never a path the manifest gives
    method: Annotated[str, Field(max_length=300)]
    calibration_samples: Annotated[int, Field(ge=0)]
    validation_samples: Annotated[int, Field(ge=0)]
    max_drop: Finite
    passed: bool
    reason: Annotated[str, Field(max_length=1000)] | None
    heads: dict[Annotated[str, Field(pattern=_IDENT)], ManifestQuantizedHead]


class Manifest(_Closed):
    """`manifest.json`: closed, as recipes are. `files` maps every file of the bundle but the
    manifest to its sha256."""

    format_version: Literal[1]
    name: Annotated[str, Field(pattern=_SLUG, max_length=200)]
    recipe_sha256: Annotated[str, Field(pattern=_SHA256)] | None
    recipe: Literal["recipe.yaml"]
    input: ManifestInput
    input_names: list[Literal["pixel_values", "input_ids", "attention_mask", "features"]]
    heads: Annotated[list[ManifestHead], Field(min_length=1)]
    formats: dict[str, ManifestFormat]
    failed_formats: dict[str, str]
    quantized: dict[Literal["int8"], ManifestQuantized] = Field(default_factory=dict)
    lora_merged: bool
    metrics: dict[str, Finite]
    source: str | None
    packages: dict[str, str]
    created: str
    files: Annotated[
        dict[Annotated[str, Field(pattern=_REL_PATH)], Annotated[str, Field(pattern=_SHA256)]], Field(min_length=1)
    ]

    @field_validator("heads")
    @classmethod
    def _unique_heads(cls, heads: list[ManifestHead]) -> list[ManifestHead]:
        names = [h.name for h in heads]
        if len(set(names)) != len(names):
            raise ValueError("head names repeat")
        return heads

    @model_validator(mode="after")
    def _paths_confined(self) -> Manifest:
        for rel in self.files:
            _confined(rel, "files")
        for name, fmt in self.formats.items():
            if name not in FORMAT_FILES:  # never quoted: a manifest may hold anything
                raise ValueError(f"formats: an unknown format (known: {', '.join(FORMAT_FILES)})")
            _confined(fmt.file, f"formats.{name}.file")
            if fmt.file != FORMAT_FILES[name]:
                raise ValueError(f"formats.{name}.file: must be {FORMAT_FILES[name]}")
            if fmt.file not in self.files:
                raise ValueError(f"formats.{name}.file: not among the hashed files")
        return self


def _confined(rel: str, where: str) -> None:
    """A manifest path stays inside its bundle: relative, no `..`, no empty or `.` parts."""
    parts = rel.split("/")
    if rel.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{where}: a path that leads outside the bundle")


def _schema_problems(err: ValidationError) -> str:
    """Where and what, never the offending value (a manifest may hold anything)."""
    problems = []
    for e in err.errors(include_input=False, include_url=False)[:3]:
        where = ".".join(str(part) for part in e.get("loc", ())) or "(top level)"
        problems.append(f"{where}: {e.get('msg')}")
    more = len(err.errors()) - len(problems)
    return "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")


def hash_files(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` except the manifest, keyed by POSIX relative path."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST
    }


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the bundle at `path`, checked against the manifest schema (not the hashes
    or the model: `load_bundle` does those)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"{path}: not a bundle folder (no such directory)")
    if not manifest_path.is_file():
        raise BundleError(f"{path}: not a bundle (no {MANIFEST}); export one with `surgery export`")
    inside(path, MANIFEST)
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(
            f"{manifest_path}: larger than {MAX_MANIFEST_BYTES // 2**20} MB; not a manifest surgery wrote"
        )
    try:
        manifest = json.loads(manifest_path.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        reason = "not UTF-8"
    except RecursionError:
        reason = "nested too deeply for a manifest"
    except _NotJSON as err:
        reason = str(err)
    except json.JSONDecodeError as err:
        reason = f"not JSON: {err.msg} at line {err.lineno} column {err.colno}"
    except ValueError:  # a number too long to convert
        reason = "not JSON a manifest could hold"
    else:
        reason = None
    if reason is not None:
        raise BundleError(f"{manifest_path}: unreadable manifest ({reason}); the bundle is damaged, export it again")
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path}: manifest is not a JSON object; the bundle is damaged, export it again")
    version = manifest.get("format_version")
    if version != BUNDLE_FORMAT_VERSION:
        shown = version if isinstance(version, int) and not isinstance(version, bool) else type(version).__name__
        raise BundleError(
            f"{manifest_path}: unknown bundle format_version {shown} (this surgery reads {BUNDLE_FORMAT_VERSION}); "
            "use the surgery version that wrote it, or export the run again"
        )
    try:
        Manifest.model_validate(manifest)
    except ValidationError as err:
        raise BundleError(f"{manifest_path}: invalid manifest: {_schema_problems(err)}") from None
    return manifest


class _NotJSON(ValueError):
    pass


def resolve_bundle(target: Path) -> Path:
    """A bundle folder, or a run folder's `bundle/` (what `serve`, `evaluate` and `predict` take)."""
    target = Path(target)
    for candidate in (target, target / "bundle"):
        if (candidate / MANIFEST).is_file():
            return candidate.resolve()
    if not target.exists():
        raise BundleError(f"{target}: no such bundle or run folder")
    raise BundleError(f"{target}: neither a bundle nor a run folder with bundle/ (run `surgery export {target}` first)")


def _no_constant(name: str) -> Any:
    raise _NotJSON(f"{name} is not a JSON number")


def inside(root: Path, rel: str) -> Path:
    """`root/rel`, resolved through every symlink, refused unless it stays inside `root`."""
    posix = PurePosixPath(rel)
    if not posix.parts or posix.is_absolute() or ".." in posix.parts or "\\" in rel:
        raise BundleError(f"{root / MANIFEST}: file entry {rel!r} points outside the bundle")
    real_root = Path(os.path.realpath(root))
    target = Path(os.path.realpath(root.joinpath(*posix.parts)))
    if target != real_root and real_root not in target.parents:
        raise BundleError(f"{root / rel}: leads outside the bundle (a symlink?); refusing to read it")
    return target


def verify_files(path: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is inside the bundle (symlinks resolved) with its recorded
    sha256, and every file in the bundle is listed."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{path / MANIFEST}: manifest lists no files; the bundle is damaged, export it again")
    for required in (WEIGHTS, RECIPE):
        if required not in files:
            raise BundleError(
                f"{path / MANIFEST}: manifest does not list {required}; the bundle is damaged, export it again"
            )
    for rel, expected in files.items():
        file = inside(path, rel)
        if not file.is_file():
            raise BundleError(
                f"{path / rel}: listed in the manifest but missing; the bundle is incomplete, export it again"
            )
        actual = sha256_file(file)
        if actual != expected:
            raise BundleError(
                f"{path / rel}: sha256 mismatch (manifest {str(expected)[:12]}…, file {actual[:12]}…); "
                "the file was modified or truncated, export the bundle again"
            )
    for rel in _bundle_files(path):
        if rel not in files:
            raise BundleError(
                f"{path / rel}: in the bundle but not in its manifest; the bundle was modified, export it again"
            )


def _bundle_files(root: Path) -> list[str]:
    """Every file and symlink under `root` but the manifest, as POSIX relative paths; symlinks
    to folders are listed, not followed."""
    found = []
    for folder, dirs, names in os.walk(root):
        base = Path(folder)
        for name in [*names, *(d for d in dirs if (base / d).is_symlink())]:
            rel = (base / name).relative_to(root).as_posix()
            if rel != MANIFEST:
                found.append(rel)
    return sorted(found)


@dataclass
class LoadedBundle:
    """A bundle loaded back: the model (eval mode, on CPU) and what serving needs around it."""

    path: Path
    model: Any  # surgery.model.SurgicalModel (None when loaded with torch_model=False)
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


def load_bundle(path: Path, *, torch_model: bool = True) -> LoadedBundle:
    """Verify and load a bundle: the manifest against its schema, every sha256, every path inside
    the bundle; the model rebuilt from the bundled recipe with no network access, weights loaded
    strictly from `model.safetensors`, and the manifest cross-checked against what was built
    (heads, labels, output sizes, input spec). Eval mode. Errors never quote the bundle's files.

    `torch_model=False` verifies the same files but builds no PyTorch model (`model` is None): for
    a runtime that runs one of the bundle's exported graphs instead, which then costs neither the
    build's time nor a second copy of the weights."""
    path = Path(path).resolve()
    manifest = read_manifest(path)
    verify_files(path, manifest)
    try:  # its header only, bounded: a header claiming 10^12 elements costs nothing (nor does building the model)
        read_safetensors_header(path / WEIGHTS)
    except ValueError as err:
        raise BundleError(
            f"{path / WEIGHTS}: not a safetensors file ({err}); the bundle is damaged, export it again"
        ) from None
    recipe = bundled_recipe(path)
    # The recipe as written at export (`recipe_sha256` is the hash of that dump), not as dumped
    # again now: a field added since, with its default, must not make every older bundle "damaged".
    if manifest.get("recipe_sha256") not in (None, sha256_file(path / RECIPE)):
        raise BundleError(
            f"{path / RECIPE}: does not match the manifest's recipe_sha256; the bundle is damaged, export it again"
        )
    spec = InputSpec.from_dict(manifest["input"])
    if not torch_model:
        tokenizer = None
        if (path / TOKENIZER_DIR).is_dir():
            spec.tokenizer = str(path / TOKENIZER_DIR)
            tokenizer = _load_tokenizer(path / TOKENIZER_DIR)
        return LoadedBundle(path, None, manifest, recipe, spec, tokenizer)
    return _with_model(path, manifest, recipe, spec)


def _with_model(path: Path, manifest: dict[str, Any], recipe: Any, spec: InputSpec) -> LoadedBundle:
    from surgery.model import build_model

    try:
        model = build_model(_recipe_for_loading(recipe, path, manifest), load_weights=False)
    except BundleError:
        raise
    except Exception as err:  # the recipe validated but does not build here (other versions?)
        raise BundleError(f"{path / RECIPE}: the bundled recipe does not build ({type(err).__name__})") from None
    try:
        load_weights(model, path / WEIGHTS)
    except ValueError as err:
        raise BundleError(f"{path / WEIGHTS}: {err}") from None
    model.eval()
    check_against_model(path, manifest, recipe, model)
    tokenizer = None
    if (path / TOKENIZER_DIR).is_dir():
        spec.tokenizer = str(path / TOKENIZER_DIR)
        tokenizer = getattr(model, "tokenizer", None) or _load_tokenizer(path / TOKENIZER_DIR)
    return LoadedBundle(path=path, model=model, manifest=manifest, recipe=recipe, input_spec=spec, tokenizer=tokenizer)


_PROBLEM_PLACE = re.compile(r":(\d+):(\d+) ([A-Za-z0-9_.\[\]]+)")


def bundled_recipe(path: Path) -> Any:
    """The bundle's resolved recipe. Its problems are reported by place and field only: the
    message never quotes the file (which need not be a recipe at all)."""
    import yaml

    from surgery.recipe import load_recipe_text

    file = path / RECIPE
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"{file}: not a UTF-8 recipe; the bundle is damaged, export it again") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        raise BundleError(f"{file}: not valid YAML; the bundle is damaged, export it again") from None
    if not isinstance(data, dict):
        raise BundleError(f"{file}: not a recipe (a mapping); the bundle is damaged, export it again")
    if "extends" in data:  # a resolved recipe extends nothing; loading it must read no other file
        raise BundleError(f"{file}: a bundled recipe must be resolved (no `extends`); export the run again")
    try:
        return load_recipe_text(text, filename=RECIPE, base_dir=path)
    except RecipeError as err:
        place = _PROBLEM_PLACE.search(err.problems[0] if err.problems else "")
        first = f"; first at line {place[1]}, {place[3]}" if place else ""
        raise BundleError(
            f"{file}: not a recipe this surgery can load ({len(err.problems)} problem(s){first}); "
            "export the run again with this version"
        ) from None


def check_against_model(path: Path, manifest: dict[str, Any], recipe: Any, model: Any) -> None:
    """The manifest says what the bundled recipe and weights build: name, heads (order, task,
    labels, output size) and input spec. Problems name the field and the built value only."""
    where = path / MANIFEST
    problems: list[str] = []
    if manifest["name"] != recipe.name:
        problems.append(f"name differs from the bundled recipe's ({recipe.name})")
    built_heads = getattr(model, "head_info", {})
    names = [h["name"] for h in manifest["heads"]]
    if names != list(built_heads):
        problems.append(f"heads are not the model's ({', '.join(built_heads)})")
    else:
        for i, head in enumerate(manifest["heads"]):
            built = built_heads[head["name"]].to_dict()
            for key in ("task", "labels", "out_features"):
                if head[key] != built.get(key):
                    problems.append(f"heads[{i}].{key} differs from the model's ({built.get(key)})")
            shape = head["output_shape"]
            if not shape or shape[-1] != built.get("out_features"):
                problems.append(
                    f"heads[{i}].output_shape does not end in the model's {built.get('out_features')} outputs"
                )
    spec = model.input_spec.to_dict()
    for key, value in manifest["input"].items():
        if key == "tokenizer":
            continue
        want = spec.get(key)
        same = (
            all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(value, want, strict=True))
            if key in ("mean", "std") and len(value) == len(want)
            else value == want
        )
        if not same:
            problems.append(f"input.{key} differs from the model's ({want})")
    if manifest["input_names"] != list(model.input_spec.input_names):
        problems.append(f"input_names differ from the model's ({', '.join(model.input_spec.input_names)})")
    if problems:
        raise BundleError(f"{where}: does not describe the bundled model: {'; '.join(problems[:3])}; export it again")


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
