"""Freeze rules, learning-rate groups, the gradual-unfreeze schedule, and frozen BatchNorm.

Globs are over parameter names (`backbone.layer4.0.conv1.weight`): `*` matches within one dotted
part, `**` across parts, `?` one character, `[...]` a character class. Rules apply in order —
`freeze` globs, then `unfreeze` globs — and the last rule that matches a parameter wins.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from torch import nn

from surgery.errors import BuildError, CheckpointError
from surgery.registry import did_you_mean
from surgery.schema import Recipe


@lru_cache(maxsize=512)
def glob_regex(glob: str) -> re.Pattern[str]:
    """`**` → any run of characters, `*` → within one dotted part, `?` → one character."""
    out, i = [], 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^.]*")
        elif c == "?":
            out.append("[^.]")
        elif c == "[":
            end = glob.find("]", i + 1)
            if end == -1:
                out.append(re.escape(c))
            else:
                body = glob[i + 1 : end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


def match_params(glob: str, names: Iterable[str]) -> list[str]:
    """The names (in order) that `glob` matches in full."""
    pattern = glob_regex(glob)
    return [n for n in names if pattern.fullmatch(n)]


def _no_match(glob: str, where: str, names: list[str]) -> BuildError:
    hint = (
        did_you_mean(glob, names) or f" (parameters look like {names[0]!r}; `surgery plan` lists them)" if names else ""
    )
    return BuildError(f"{where} glob {glob!r} matches no parameter{hint}")


def _params(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())


def _initially_trainable(name: str, lora: bool) -> bool:
    # With LoRA adapters the backbone's own weights start frozen (peft's convention); rules may
    # still unfreeze them.
    return not (lora and name.startswith("backbone.") and ".lora_" not in name)


def apply_freeze_rules(model: nn.Module, recipe: Recipe) -> None:
    """Set `requires_grad` from the recipe's `freeze` then `unfreeze` globs (last match wins)."""
    params = _params(model)
    names = list(params)
    lora = any(".lora_" in n for n in names)
    trainable = {n: _initially_trainable(n, lora) for n in names}
    rules = [(g, False, "freeze") for g in recipe.freeze] + [(g, True, "unfreeze") for g in recipe.unfreeze]
    for glob, value, where in rules:
        matched = match_params(glob, names)
        if not matched:
            raise _no_match(glob, where, names)
        for n in matched:
            trainable[n] = value
    for n, p in params.items():
        p.requires_grad_(trainable[n])


def unfreeze(model: nn.Module, glob: str) -> list[str]:
    """Make the parameters `glob` matches trainable; returns those that were frozen before."""
    params = _params(model)
    matched = match_params(glob, params)
    if not matched:
        raise _no_match(glob, "unfreeze", list(params))
    newly = [n for n in matched if not params[n].requires_grad]
    for n in matched:
        params[n].requires_grad_(True)
    return newly


def apply_unfreeze_schedule(model: nn.Module, recipe: Recipe, epoch: int) -> list[str]:
    """Called by the trainer at the start of each epoch: carry out every `train.unfreeze_at` entry
    due by `epoch` (so a resumed run catches up), returning the names newly made trainable."""
    newly: list[str] = []
    for entry in recipe.train.unfreeze_at:
        if entry.epoch <= epoch:
            newly.extend(n for n in unfreeze(model, entry.params) if n not in newly)
    if newly:
        set_frozen_batchnorm_eval(model, recipe)
    return newly


def check_unfreeze_schedule(model: nn.Module, recipe: Recipe) -> None:
    """Build-time check that each `unfreeze_at` glob names parameters (so a typo fails now, not at epoch N)."""
    names = list(_params(model))
    for entry in recipe.train.unfreeze_at:
        if not match_params(entry.params, names):
            raise _no_match(entry.params, "train.unfreeze_at", names)
    for group in recipe.train.lr_groups:
        if not match_params(group.params, names):
            raise _no_match(group.params, "train.lr_groups", names)


def freeze_state(model: nn.Module) -> dict[str, bool]:
    """Parameter name → requires_grad (saved in every checkpoint)."""
    return {n: p.requires_grad for n, p in model.named_parameters()}


def load_freeze_state(model: nn.Module, state: dict[str, bool]) -> None:
    """Restore `freeze_state` output exactly; names must match the model's."""
    params = _params(model)
    missing, unknown = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unknown:
        raise CheckpointError(
            f"freeze state does not fit the model (missing: {missing[:3]}, unknown: {unknown[:3]}); was the recipe's model changed?"
        )
    for n, p in params.items():
        p.requires_grad_(bool(state[n]))


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def frozen_batchnorms(model: nn.Module) -> list[str]:
    """BatchNorm layers all of whose parameters are frozen (affine-free ones count when every
    parameter of their parent is frozen)."""
    parents = dict(model.named_modules())
    names = []
    for name, module in parents.items():
        if not _is_batchnorm(module):
            continue
        params = list(module.parameters()) or list(parents[name.rpartition(".")[0]].parameters())
        if params and not any(p.requires_grad for p in params):
            names.append(name)
    return names


def set_frozen_batchnorm_eval(model: nn.Module, recipe: Recipe) -> None:
    """Put BatchNorm layers inside frozen parts in eval mode (running stats untouched), unless
    `train.frozen_batchnorm: train`. Call after every `model.train()`."""
    if recipe.train.frozen_batchnorm == "train":
        return
    for name in frozen_batchnorms(model):
        model.get_submodule(name).eval()


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """Optimizer groups over every parameter (frozen ones included, so a later unfreeze needs no
    new group), one per learning-rate scale: `lr_groups` by glob then `unfreeze_at` scales, last
    match wins. Each group has `params`, `names`, `lr_scale` and `lr`."""
    params = _params(model)
    scale = dict.fromkeys(params, 1.0)
    rules = [(g.params, g.lr_scale) for g in recipe.train.lr_groups] + [
        (u.params, u.lr_scale) for u in recipe.train.unfreeze_at
    ]
    for glob, lr_scale in rules:
        for n in match_params(glob, params):
            scale[n] = lr_scale
    groups: dict[float, dict[str, Any]] = {}
    for n, p in params.items():
        group = groups.setdefault(
            scale[n], {"params": [], "names": [], "lr_scale": scale[n], "lr": recipe.train.optimizer.lr * scale[n]}
        )
        group["params"].append(p)
        group["names"].append(n)
    return list(groups.values())
