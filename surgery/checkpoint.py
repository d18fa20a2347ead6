"""Checkpoints: atomic, verified, ranked.

Layout, under `<run>/checkpoints/`:

    step-00000120/  model.safetensors  what training changes: trainable parameters and the
                                       buffers that differ from the built model's (BatchNorm
                                       statistics); frozen tensors are not stored but referenced
                                       by meta's "frozen" content hash
                    trainer.pt         optimizer, scheduler, scaler, RNG states, data position,
                                       freeze / early-stopping / unfreeze state (torch.save; loaded
                                       with weights_only=True)
                    recipe.yaml        the resolved recipe that produced it
                    meta.json          {"epoch", "step", "batch_in_epoch", "metrics",
                                        "recipe_sha256", "frozen": {"tensors", "sha256"},
                                        "files": {name: sha256}, "complete": true}
    index.json      {"last": "step-...", "best": [["step-...", value], ...]}

A checkpoint is written into a hidden temporary sibling, every file and the folder fsynced, then
renamed into place: a run killed at any instant leaves either a complete checkpoint or a
temporary folder that is ignored. `meta.json` is written last and lists the sha256 of the other
files; a checkpoint whose meta is missing or incomplete, or whose files don't match it, is skipped
with a warning and never loaded.

Lean checkpoints: a frozen backbone is rebuilt from the recipe (its pretrained or seeded weights)
when a checkpoint is loaded, and checked against the sha256 of the frozen tensors recorded when
training started (over each tensor's dtype, shape and bytes); a mismatch is a refusal, never a
silently different model. A checkpoint without "frozen" holds every tensor (older runs).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from surgery.errors import CheckpointError
from surgery.files import check_free_space, fsync_path, sha256_file, temporary_until_renamed, write_json_atomic

CHECKPOINTS = "checkpoints"
INDEX = "index.json"
MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"
RECIPE_FILE = "recipe.yaml"
META_FILE = "meta.json"
_TMP_PREFIX = ".tmp-"


class CheckpointWarning(UserWarning):
    """A checkpoint that is skipped (partial, corrupt) or a leftover temporary folder."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _nbytes(value: Any) -> int:
    """Bytes of the tensors in a (nested) state: what writing it will take, about."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 64


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    import hashlib

    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    digest = hashlib.sha256(f"{tensor.dtype} {list(tensor.shape)}\n".encode())
    digest.update(data)
    return digest.hexdigest()


def tensor_digests(model: torch.nn.Module) -> dict[str, str]:
    """State-dict name → `tensor_digest`, taken once when training starts: what lean checkpoints
    reference frozen tensors by."""
    return {name: tensor_digest(t) for name, t in model.state_dict().items()}


def frozen_digest(digests: dict[str, str], names: list[str] | set[str]) -> str:
    """One sha256 over the named tensors' digests (sorted by name)."""
    import hashlib

    return hashlib.sha256("".join(f"{n} {digests[n]}\n" for n in sorted(names)).encode()).hexdigest()


def trained_tensors(model: torch.nn.Module, reference: dict[str, str] | None) -> tuple[list[str], list[str]]:
    """(stored, frozen) state-dict names: trainable parameters and buffers that changed since
    `reference` are stored; with no reference, everything is."""
    stored, frozen = [], []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if reference is None or name not in reference:
            keep = True
        elif isinstance(tensor, torch.nn.Parameter):
            keep = tensor.requires_grad
        else:
            keep = tensor_digest(tensor) != reference[name]
        (stored if keep else frozen).append(name)
    return stored, frozen


def _model_tensors(model: torch.nn.Module, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors sharing storage (tied weights): give duplicates their own copy.
    seen: set[tuple[int, int]] = set()
    tensors = {}
    wanted = set(names) if names is not None else None
    for name, tensor in model.state_dict().items():
        if wanted is not None and name not in wanted:
            continue
        tensor = tensor.detach().cpu().contiguous()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        seen.add((tensor.untyped_storage().data_ptr(), tensor.storage_offset()))
        tensors[name] = tensor
    return tensors


# --------------------------------------------------------------------------- save


def save_checkpoint(
    run_dir: Path,
    *,
    model: torch.nn.Module,
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    recipe_text: str,
    monitor: str | None,
    mode: str,
    keep_best: int,
    reference: dict[str, str] | None = None,
) -> Path:
    """Write `step-<meta.step>/` atomically, update index.json (last, k best by `monitor`) and prune.
    `monitor` None: the checkpoint is not ranked (nothing evaluated it). With `reference`
    (`tensor_digests` of the model as built), frozen tensors are referenced by their content hash
    instead of stored."""
    from safetensors.torch import save_file

    stored, frozen = trained_tensors(model, reference)
    if reference is not None:
        meta = {**meta, "frozen": {"tensors": len(frozen), "sha256": frozen_digest(reference, frozen)}}

    folder = Path(run_dir) / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(int(meta["step"]))
    tmp = folder / f"{_TMP_PREFIX}{name}.{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    final = folder / name
    tensors = _model_tensors(model, stored)
    needed = _nbytes(tensors) + _nbytes(trainer_state) + len(recipe_text.encode()) + (64 << 10)
    check_free_space(folder, needed)  # a full disk is refused before anything is written
    with temporary_until_renamed(tmp, final, needed):  # and if it fills up meanwhile, tmp goes
        tmp.mkdir()
        save_file(tensors, str(tmp / MODEL_FILE))
        torch.save(trainer_state, tmp / TRAINER_FILE)
        (tmp / RECIPE_FILE).write_text(recipe_text)
        files = {f: sha256_file(tmp / f) for f in (MODEL_FILE, TRAINER_FILE, RECIPE_FILE)}
        (tmp / META_FILE).write_text(json.dumps({**meta, "files": files, "complete": True}, indent=2, sort_keys=True))
        for f in (*files, META_FILE):
            fsync_path(tmp / f)
        fsync_path(tmp)
        if final.exists():  # the same step saved again (e.g. a resumed run): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
    fsync_path(folder)
    _update_index(folder, name, meta.get("metrics", {}).get(monitor) if monitor else None, mode, keep_best)
    return final


def _update_index(folder: Path, name: str, value: float | None, mode: str, keep_best: int) -> None:
    index = read_index(folder.parent)
    best = [entry for entry in index.get("best", []) if entry[0] != name]
    if value is not None and math.isfinite(value) and keep_best > 0:  # a NaN would rank anywhere
        best.append([name, float(value)])
        best.sort(key=lambda e: e[1] if mode == "min" else -e[1])
        best = best[:keep_best]
    index = {"last": name, "best": best}
    write_json_atomic(folder / INDEX, index, sort_keys=True)
    keep = {name, *(e[0] for e in best)}
    for path in folder.iterdir():
        if path.is_dir() and path.name.startswith("step-") and path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)
        elif _leftover(path.name):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _leftover(name: str) -> bool:
    """Whether a name under checkpoints/ is a temporary another (dead) process left: a checkpoint
    folder it was writing, or its index.json (`files.write_json_atomic` names those `.index.json.<pid>.tmp`)."""
    pid = str(os.getpid())
    if name.startswith(_TMP_PREFIX):
        return not name.endswith(f".{pid}")
    prefix = f".{INDEX}."
    return name.startswith(prefix) and name.endswith(".tmp") and name[len(prefix) : -len(".tmp")] != pid


def read_index(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / CHECKPOINTS / INDEX
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {"last": None, "best": []}


# --------------------------------------------------------------------------- verify & find


def read_meta(ckpt_dir: Path) -> dict[str, Any]:
    """The checkpoint's meta.json (raises CheckpointError if it is missing or unreadable)."""
    path = Path(ckpt_dir) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {ckpt_dir} has no readable {META_FILE}: {err}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {ckpt_dir}: {META_FILE} is not an object")
    return meta


def verify_checkpoint(ckpt_dir: Path) -> str | None:
    """None if the checkpoint is complete and every file matches its hash, else why not."""
    try:
        meta = read_meta(ckpt_dir)
    except CheckpointError as err:
        return str(err)
    if meta.get("complete") is not True or not {"epoch", "step", "files"} <= set(meta):
        return f"checkpoint {ckpt_dir} is incomplete"
    for name, digest in meta["files"].items():
        path = Path(ckpt_dir) / name
        if not path.is_file():
            return f"checkpoint {ckpt_dir} lacks {name}"
        if sha256_file(path) != digest:
            return f"checkpoint {ckpt_dir}: {name} does not match its recorded sha256 (truncated or modified)"
    return None


def _valid(ckpt_dir: Path) -> bool:
    problem = verify_checkpoint(ckpt_dir)
    if problem is not None:
        warnings.warn(f"skipping {problem}", CheckpointWarning, stacklevel=3)
    return problem is None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders, newest step first (unverified); warns about leftover temporary folders."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    for path in folder.iterdir():
        if path.name.startswith(_TMP_PREFIX) and path.is_dir():
            warnings.warn(f"ignoring {path}: a checkpoint whose save was interrupted", CheckpointWarning, stacklevel=3)
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def find_last(run_dir: Path) -> Path:
    """The newest complete, verified checkpoint of a run (partial/corrupt ones skipped with a warning)."""
    for path in list_checkpoints(run_dir):
        if _valid(path):
            return path
    raise CheckpointError(f"run {run_dir} has no complete checkpoint to resume from or export")


def find_best(run_dir: Path) -> Path:
    """The best verified checkpoint by the recipe's `train.checkpoint.monitor`; the last one when
    none was ranked (no validation yet, or keep_best: 0)."""
    folder = Path(run_dir) / CHECKPOINTS
    for name, _value in read_index(run_dir).get("best", []):
        path = folder / name
        if path.is_dir() and _valid(path):
            return path
    return find_last(run_dir)


def load_checkpoint(ckpt_dir: Path, model: torch.nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify, load the weights into `model`, and return (trainer_state, meta)."""
    problem = verify_checkpoint(ckpt_dir)
    if problem is not None:
        raise CheckpointError(problem)
    meta = read_meta(ckpt_dir)
    load_model_state(ckpt_dir, model, meta)
    trainer = torch.load(Path(ckpt_dir) / TRAINER_FILE, weights_only=True, map_location="cpu")
    return trainer, meta


def load_model_state(ckpt_dir: Path, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    """Load a (verified) checkpoint's tensors into `model`, built from the run's recipe: the frozen
    tensors a lean checkpoint references must be the ones `model` already holds."""
    from safetensors.torch import load_file

    state = load_file(str(Path(ckpt_dir) / MODEL_FILE))
    own = model.state_dict()
    frozen = [n for n in own if n not in state]
    if "frozen" in meta:
        expected = meta["frozen"]
        digests = {n: tensor_digest(own[n]) for n in frozen}
        if len(frozen) != expected.get("tensors") or frozen_digest(digests, frozen) != expected.get("sha256"):
            raise CheckpointError(
                f"checkpoint {ckpt_dir} stores only what training changed; its {expected.get('tensors')} frozen "
                f"tensors (sha256 {str(expected.get('sha256'))[:12]}…) are not the {len(frozen)} the recipe's model "
                "has now (different pretrained weights, a changed `weights:` file, or another library version "
                "initialising differently); refusing to load it"
            )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [n for n in missing if "frozen" not in meta or n not in frozen]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def stores_all_weights(meta: dict[str, Any]) -> bool:
    """Whether a checkpoint holds every tensor (so rebuilding its model needs no pretrained weights)."""
    return int(meta.get("frozen", {}).get("tensors", 0)) == 0


def trained_model(recipe: Any, ckpt_dir: Path) -> Any:
    """The recipe's model with a checkpoint's weights, complete: built with its pretrained weights
    when the checkpoint references frozen ones (and checked against them), without otherwise."""
    from surgery.model import build_model

    problem = verify_checkpoint(ckpt_dir)
    if problem is not None:
        raise CheckpointError(problem)
    meta = read_meta(ckpt_dir)
    model = build_model(recipe, load_weights=not stores_all_weights(meta))
    load_model_state(ckpt_dir, model, meta)
    return model


# --------------------------------------------------------------------------- random state


def rng_state(seed: int | None = None) -> dict[str, Any]:
    """Python, numpy, torch and CUDA RNG states, in a form torch.load(weights_only=True) accepts.
    With `seed`, Python's and numpy's generators (which training itself doesn't draw from) are
    stored as `["seeded", seed]` while they are still as `seed_everything(seed)` left them: 5 KB
    less per checkpoint, the same state on restore."""
    import random

    import numpy as np

    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    python = random.getstate()
    if seed is not None and python == random.Random(seed).getstate():
        state["python"] = ["seeded", seed]
    else:
        version, mt, gauss = python
        # 32-bit words stored as int32 (bit for bit): half the bytes of int64 or pickled ints
        words = torch.from_numpy(np.array(mt[:-1], dtype=np.uint32).view(np.int32).copy())
        state["python"] = [version, words, int(mt[-1]), gauss]
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    seeded = np.random.RandomState(seed % 2**32).get_state() if seed is not None else None
    if seeded is not None and (pos, has_gauss, cached) == seeded[2:] and np.array_equal(keys, seeded[1]):
        state["numpy"] = ["seeded", seed]
    else:
        words = torch.from_numpy(keys.astype(np.uint32).view(np.int32).copy())
        state["numpy"] = [kind, words, int(pos), int(has_gauss), float(cached)]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    python = state["python"]
    if python[0] == "seeded":
        random.seed(python[1])
    elif len(python) == 4:  # int32 words and the position
        version, words, index, gauss = python
        random.setstate((version, (*words.numpy().view(np.uint32).tolist(), index), gauss))
    else:  # checkpoints before the compact form: a list of ints
        version, mt, gauss = python
        random.setstate((version, tuple(mt), gauss))
    saved = state["numpy"]
    if saved[0] == "seeded":
        np.random.seed(saved[1] % 2**32)
    else:
        kind, keys, pos, has_gauss, cached = saved
        words = keys.numpy().view(np.uint32) if keys.dtype == torch.int32 else keys.numpy().astype("uint32")
        np.random.set_state((kind, words, pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- resume contract

SAFE_TO_CHANGE = (
    "train.epochs",
    "train.max_steps",
    "train.early_stopping.patience",
    "monitor.",
    "export.",
    "serve.",
    "description",
)


def is_safe_change(path: str) -> bool:
    """Fields a resumed run may change: how long it runs, patience, logging, export/serve settings."""
    return any(path == p or (p.endswith(".") and path.startswith(p)) for p in SAFE_TO_CHANGE)


def check_resume(old_recipe: Any, new_recipe: Any, *, force: bool) -> list[str]:
    """Lines describing the recipe change; raises CheckpointError when an unsafe field changed
    and `force` is off."""
    from surgery.recipe import recipe_diff

    diff = recipe_diff(old_recipe, new_recipe)
    lines = [f"  {path}: {old!r} -> {new!r}" for path, old, new in diff]
    unsafe = [path for path, _, _ in diff if not is_safe_change(path)]
    if unsafe and not force:
        raise CheckpointError(
            "the recipe changed since the checkpoint was written; refusing to resume "
            f"(unsafe: {', '.join(unsafe)}). Changes:\n"
            + "\n".join(lines)
            + "\nUse --force to resume anyway, or start a new run without --resume."
        )
    return lines
