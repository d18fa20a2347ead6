"""Frozen-feature caching (`train.cache_features`): when nothing before the heads' taps trains,
compute what each head reads once and train the heads on it, instead of running the frozen
backbone every epoch.

It is exact only when the backbone's part before the taps is a fixed function of each sample:

- no parameter before a tap trains (a trainable backbone parameter, a LoRA adapter), found by
  asking autograd which parameters the taps depend on, so a trainable classifier *after* the
  `pooled` tap doesn't count;
- the inputs are the same every epoch (no `data.augment`);
- no layer before a tap computes differently in training (dropout or drop-path with p > 0,
  BatchNorm updating its statistics, i.e. `train.frozen_batchnorm: train` or a trainable one):
  checked by type, and by comparing a training-mode forward with an evaluation-mode one;
- a head doesn't read unpooled tokens (their length follows each batch's padding).

A `train.unfreeze_at` entry that unfreezes something before a tap ends the cache at its epoch:
the cache is used until then and dropped when the epoch arrives. `auto` caches when this holds
and says so in one line (or why not); `on` makes "not exact" an error with the reason.

The cache is `<run>/features/cache.safetensors` (train and validation features, keyed by the
frozen weights, the data settings and what the heads read), reused by a resumed run. Training
batches are gathered from it in exactly the order the data sampler gives (so data order, resume
positions and RNG use are the uncached run's); validation is cached batch by batch as the
validation loader forms them, so validation metrics are the uncached run's.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from surgery.errors import SurgeryError
from surgery.files import fsync_path
from surgery.schema import Recipe

FEATURES_DIR = "features"
CACHE_FILE = "cache.safetensors"
_MAX_SHARE_OF_FREE_MEMORY = 0.25  # `auto` skips a cache bigger than this share of available RAM


@dataclass
class CacheDecision:
    """Whether features are cached, why (one line), and the epoch an `unfreeze_at` ends it (or None)."""

    cache: bool
    reason: str
    until_epoch: int | None = None


def _read_key(read: tuple[str, str, int]) -> str:
    kind, pool, index = read
    return kind + (f":{pool}" if kind == "tokens" else "") + (f":{index}" if kind == "features" else "")


def _names(names: list[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# --------------------------------------------------------------------------- deciding


def _upstream(model: nn.Module) -> tuple[list[str], list[str], dict[str, int]]:
    """Parameters the heads' inputs depend on, modules that ran to compute them, and the bytes
    per sample of each read: one small forward with every parameter made to require grad."""
    params = dict(model.named_parameters())
    was = {n: p.requires_grad for n, p in params.items()}
    ran: list[tuple[str, Tensor | None]] = []  # modules in call order, with an output to ask autograd about

    def record(name: str, output: Any) -> None:
        ran.append((name, output if isinstance(output, Tensor) and output.requires_grad else None))

    handles = [
        m.register_forward_hook(lambda mod, a, o, name=name: record(name, o))
        for name, m in model.backbone.named_modules()
    ]
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    training = model.training
    try:
        for p in params.values():
            p.requires_grad_(True)
        model.eval()
        with torch.enable_grad():
            reads = model.read_taps(model.taps(*_example_inputs(model, 1)))
            outputs = [t for t in reads.values() if t.requires_grad]
            probes = [t for _, t in ran if t is not None]
            grads = (
                torch.autograd.grad([t.float().sum() for t in outputs], [*params.values(), *probes], allow_unused=True)
                if outputs
                else [None] * (len(params) + len(probes))
            )
        per_sample = {head: t[0].numel() * t.element_size() for head, t in reads.items()}
    finally:
        for h in handles:
            h.remove()
        for n, p in params.items():
            p.requires_grad_(was[n])
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
        model.train(training)
    upstream = [n for n, g in zip(params, grads[: len(params)], strict=True) if g is not None]
    feeding = iter(grads[len(params) :])
    # a module feeds the taps when autograd reaches its output (one it can't ask about counts as feeding)
    before = [name for name, out in ran if out is None or next(feeding) is not None]
    return upstream, [f"backbone.{n}" if n else "backbone" for n in before], per_sample


def _example_inputs(model: Any, batch: int) -> tuple[Tensor, ...]:
    device = next(model.parameters()).device
    return tuple(t.to(device) for t in model.example_inputs(batch))


def _random_in_training(model: nn.Module, ran: list[str]) -> list[str]:
    """Modules that ran before the taps and compute differently in training mode (model.train()
    with frozen BatchNorm handled as training would handle it)."""
    training = model.training
    model.train()
    try:
        found = []
        for name in dict.fromkeys(ran):
            module = model.get_submodule(name)
            if not module.training:
                continue
            kind = type(module).__name__
            p = getattr(module, "p", None) if isinstance(module, nn.modules.dropout._DropoutNd) else None
            drop = getattr(module, "drop_prob", None) or getattr(module, "p", None)
            if (
                (p is not None and p > 0)
                or isinstance(module, nn.modules.batchnorm._BatchNorm)
                or (("DropPath" in kind or "StochasticDepth" in kind or "DropBlock" in kind) and drop)
            ):
                found.append(f"{name} ({kind})")
        return found
    finally:
        model.train(training)


def _same_in_train_and_eval(model: nn.Module) -> bool:
    """A backstop for layers the type check doesn't know: the heads' inputs from a training-mode
    forward equal those of an evaluation-mode one (buffers and RNG restored after)."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    training = model.training
    inputs = _example_inputs(model, 2)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.eval()
            expected = model.read_taps(model.taps(*inputs))
            model.train()
            got = model.read_taps(model.taps(*inputs))
        return all(torch.allclose(expected[k].float(), got[k].float(), rtol=1e-5, atol=1e-6) for k in expected)
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
        model.train(training)


def decide(model: nn.Module, recipe: Recipe, *, epoch: int, applied_through: int, num_samples: int) -> CacheDecision:
    """Whether caching the heads' inputs is exact for `model` from `epoch` on, with `unfreeze_at`
    entries up to epoch `applied_through` already carried out (see the module doc)."""
    from surgery.freeze import match_params

    setting = recipe.train.cache_features
    if setting == "off":
        return CacheDecision(False, "train.cache_features is off")
    assert recipe.data is not None
    if recipe.data.augment:
        kinds = ", ".join(a.kind for a in recipe.data.augment)
        return CacheDecision(False, f"data.augment changes the inputs every epoch ({kinds})")
    unpooled = [h.name for h in recipe.heads if h.input == "tokens" and h.pool == "none"]
    if unpooled:
        return CacheDecision(False, f"head {unpooled[0]!r} reads unpooled tokens, whose length follows each batch")
    try:
        upstream, ran, per_sample = _upstream(model)
    except torch.OutOfMemoryError:
        return CacheDecision(False, "out of memory while finding what the heads' inputs depend on")
    params = dict(model.named_parameters())
    training = [n for n in upstream if params[n].requires_grad]
    if training:
        lora = [n for n in training if ".lora_" in n]
        what = "LoRA adapters" if lora else "trainable parameters"
        return CacheDecision(False, f"{what} before the heads' taps train ({_names(lora or training)})")
    random_layers = _random_in_training(model, ran)
    if random_layers:
        return CacheDecision(
            False, f"layers before the heads' taps compute differently in training: {_names(random_layers)}"
        )
    try:
        same = _same_in_train_and_eval(model)
    except torch.OutOfMemoryError:
        return CacheDecision(False, "out of memory while comparing training and evaluation mode")
    if not same:
        return CacheDecision(False, "the backbone's output differs between training and evaluation mode")
    nbytes = sum(per_sample[h] for h in _unique_reads(model).values()) * num_samples
    if setting == "auto":
        import psutil

        available = psutil.virtual_memory().available
        if nbytes > available * _MAX_SHARE_OF_FREE_MEMORY:
            return CacheDecision(
                False, f"the cache would take {nbytes / 2**20:,.0f} MiB, over a quarter of the free memory"
            )
    upstream_set = set(upstream)
    until = [u.epoch for u in recipe.train.unfreeze_at if upstream_set & set(match_params(u.params, params))]
    until_epoch = min((e for e in until if e > applied_through), default=None)
    if until_epoch is not None and until_epoch <= epoch:
        return CacheDecision(
            False, f"train.unfreeze_at unfreezes part of the backbone before the taps at epoch {until_epoch}"
        )
    why = "the backbone is frozen up to the heads' taps and the inputs are fixed"
    if until_epoch is not None:
        why += f", until train.unfreeze_at unfreezes part of it at epoch {until_epoch}"
    return CacheDecision(True, f"{why} ({nbytes / 2**20:,.1f} MiB)", until_epoch)


def _unique_reads(model: Any) -> dict[str, str]:
    """Read key → the first head reading it (heads reading the same tap share one cached tensor)."""
    unique: dict[str, str] = {}
    for head, read in model.tap_reads().items():
        unique.setdefault(_read_key(read), head)
    return unique


def explain_refusal(decision: CacheDecision) -> SurgeryError:
    return SurgeryError(
        f"train.cache_features is on, but caching the heads' inputs would not be exact: {decision.reason}; "
        "use `auto` (cache only when exact) or `off`"
    )


# --------------------------------------------------------------------------- the cache


@dataclass
class FeatureCache:
    """Cached head inputs for every training sample (by index) and every validation batch."""

    heads: dict[str, str]  # head name → read key
    train: dict[str, Tensor]  # read key → [num_train, ...]
    val: dict[str, Tensor]  # read key → [num_val, ...] in validation-loader order
    val_batches: list[int]  # sizes of the validation loader's batches
    until_epoch: int | None
    train_targets: dict[str, Tensor]
    first_val_inputs: tuple[Tensor, ...] | None = None  # for sample-prediction images

    def covers(self, epoch: int) -> bool:
        return self.until_epoch is None or epoch < self.until_epoch

    def _inputs(self, split: dict[str, Tensor], index: Tensor | slice) -> dict[str, Tensor]:
        return {head: split[key][index] for head, key in self.heads.items()}

    def train_batches(self, sampler: Any) -> Iterator[Any]:
        """(head inputs, targets) for each batch the sampler gives, in its order (resume skip included)."""
        for keys in sampler:
            index = torch.tensor([i for _epoch, i in keys], dtype=torch.long)
            yield self._inputs(self.train, index), {name: t[index] for name, t in self.train_targets.items()}

    def val_batches_with(self, loader: Any) -> Iterator[Any]:
        """(head inputs, targets) for each batch the validation `loader` forms, in its order."""
        start = 0
        for size, (_none, targets) in zip(self.val_batches, _targets_only(loader), strict=True):
            yield self._inputs(self.val, slice(start, start + size)), targets
            start += size


def _key(model: Any, recipe: Recipe, weights_digest: str, num_train: int, num_val: int) -> str:
    assert recipe.data is not None
    parts = {
        "weights": weights_digest,
        "reads": sorted(_unique_reads(model)),
        "data": recipe.data.model_dump(mode="json"),
        "input": model.input_spec.to_dict(),
        "precision": recipe.train.precision,
        "samples": [num_train, num_val],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _compute(
    model: Any,
    batches: Any,
    device: torch.device,
    autocast: Callable[[], Any],
    training: bool,
) -> tuple[dict[str, list[Tensor]], list[int], Any]:
    unique = _unique_reads(model)
    out: dict[str, list[Tensor]] = {key: [] for key in unique}
    sizes: list[int] = []
    first = None
    model.train(training)
    with torch.inference_mode(), autocast():
        for inputs, _targets in batches:
            if first is None:
                first = inputs
            reads = model.read_taps(model.taps(*(t.to(device) for t in inputs)))
            for key, head in unique.items():
                out[key].append(reads[head].cpu())
            sizes.append(inputs[0].shape[0])
    return out, sizes, first


def build_or_load(
    model: Any,
    recipe: Recipe,
    data: Any,
    decision: CacheDecision,
    *,
    run_dir: Path,
    device: torch.device,
    autocast: Callable[[], Any],
    weights_digest: str,
    write: bool,
) -> tuple[FeatureCache, bool]:
    """The run's feature cache: read from `<run>/features/` when its key matches, else computed
    (training mode as training runs it, then evaluation mode for validation) and, with `write`,
    saved there. Returns the cache and whether it was reused."""
    from safetensors.torch import load_file, save_file
    from torch.utils.data import DataLoader

    key = _key(model, recipe, weights_digest, data.num_train, data.num_val)
    path = Path(run_dir) / FEATURES_DIR / CACHE_FILE
    heads = {head: _read_key(read) for head, read in model.tap_reads().items()}
    targets = data.train.dataset.examples.targets
    first = next(iter(data.val))[0]
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") == key:
            tensors = load_file(str(path))
            train = {k.removeprefix("train/"): v for k, v in tensors.items() if k.startswith("train/")}
            val = {k.removeprefix("val/"): v for k, v in tensors.items() if k.startswith("val/")}
            sizes = json.loads(meta["val_batches"])
            return FeatureCache(heads, train, val, sizes, decision.until_epoch, targets, first), True
    was_training = model.training
    dataset = data.train.dataset
    ordered = DataLoader(
        dataset,
        batch_size=data.val.batch_size,
        shuffle=False,
        num_workers=data.train.num_workers,
        collate_fn=data.train.collate_fn,
        generator=torch.Generator().manual_seed(0),
    )
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            train_parts, _, _ = _compute(model, ordered, device, autocast, training=True)
            val_parts, sizes, _ = _compute(model, data.val, device, autocast, training=False)
    finally:
        model.train(was_training)
    train = {k: torch.cat(v) for k, v in train_parts.items()}
    val = {k: torch.cat(v) for k, v in val_parts.items()}
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{CACHE_FILE}.{os.getpid()}")
        tensors = {**{f"train/{k}": v for k, v in train.items()}, **{f"val/{k}": v for k, v in val.items()}}
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata={"key": key, "val_batches": json.dumps(sizes)},
        )
        fsync_path(tmp)
        os.replace(tmp, path)
    return FeatureCache(heads, train, val, sizes, decision.until_epoch, targets, first), False


def _targets_only(loader: Any) -> Iterator[Any]:
    """The validation loader's batches without preprocessing the inputs again: targets only,
    batched as the loader batches them."""
    dataset = loader.dataset
    targets = dataset.examples.targets
    n = len(dataset)
    size = loader.batch_size
    for start in range(0, n, size):
        index = torch.arange(start, min(n, start + size))
        yield None, {name: t[index] for name, t in targets.items()}


def drop(run_dir: Path) -> None:
    """Remove the run's feature cache (an `unfreeze_at` epoch made it stale)."""
    folder = Path(run_dir) / FEATURES_DIR
    (folder / CACHE_FILE).unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
