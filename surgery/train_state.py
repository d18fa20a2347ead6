"""What a run's checkpoints hold besides weights, and the one object that saves and restores them.

`TrainState` is the loop's progress (epoch, position in it, optimizer steps, early-stopping and
out-of-memory state). A `Checkpointer` is made once per run from what a checkpoint is made of
(model, optimizer, schedule, scaler, the resolved recipe, the digests frozen tensors are
referenced by), so the loop saves with `checkpointer.save(state, evaluated=...)` and resumes with
`checkpointer.restore(...)`. Everything random derives from `train.seed` and is saved too, so a
CPU run killed and resumed ends bit-identical to the same run uninterrupted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgery import checkpoint as ckpt
from surgery.errors import SurgeryError
from surgery.monitor import Progress
from surgery.ranks import Placement
from surgery.schema import Recipe


@dataclass
class TrainState:
    """Progress and watch state saved in every checkpoint (besides model/optimizer/RNG)."""

    epoch: int = 0  # epoch in progress (0-based)
    batch: int = 0  # micro-batches of `epoch` already consumed
    step: int = 0  # optimizer steps done
    best: float | None = None  # early stopping: best monitored value
    bad_epochs: int = 0  # early stopping: epochs since the evaluation that set `best`
    best_epoch: int | None = None  # early stopping: epochs done when `best` was set
    stopped_early: bool = False
    unfrozen_through: int = -1  # last epoch whose `unfreeze_at` entries were applied
    micro_split: int = 1  # micro-batches each loaded batch is cut into (grows on out-of-memory)
    eval_split: int = 1  # the same for validation batches
    oom_retries: int = 0  # steps retried after running out of memory
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient norm
    nonfinite_in_a_row: int = 0  # ...of them, the latest run of consecutive ones
    metrics: dict[str, float] = field(default_factory=dict)


class TrainingDiverged(SurgeryError):
    """The loss or the gradients stayed non-finite (or the weights became so): the run stops."""


def diverged(what: str, precision: str) -> TrainingDiverged:
    """The one line a diverged run stops with: what happened, the dtype, and what to change."""
    advice = "lower train.optimizer.lr, set or lower train.clip_grad_norm"
    advice += ", or train in fp32" if precision != "fp32" else ", or add warmup (train.scheduler.warmup_steps)"
    return TrainingDiverged(f"training diverged in {precision}: {what}; {advice}")


def check_finite_weights(model: Any, step: int, precision: str) -> None:
    """Refuse to go on with (checkpoint, rank, export) a model whose trainable weights or floating
    buffers (BatchNorm statistics) are not finite."""
    tensors = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    tensors += [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    with torch.no_grad():
        bad = next((n for n, t in tensors if not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise diverged(f"the weights became non-finite by step {step} ({bad})", precision)


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False


@dataclass
class Checkpointer:
    """Saves and restores one run's checkpoints. Rank 0 writes; every rank returns from `save`
    once the checkpoint is on disk. Frozen tensors are referenced by their digests in `reference`
    (taken when the model was built) instead of stored. `saved` and `last` say what this run has
    saved so far (`saved` is the same on every rank, `last` only rank 0 knows)."""

    placement: Placement
    run_dir: Path
    recipe: Recipe
    recipe_text: str  # the resolved recipe as it is written into each checkpoint
    model: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    reference: dict[str, str]
    saved: bool = False
    last: Path | None = None

    def save(self, state: TrainState, *, evaluated: bool) -> Path | None:
        """Checkpoint the run at `state`; the folder on rank 0, None on the other ranks. Only a
        checkpoint `evaluated` right before it is ranked for `keep_best` (a mid-epoch one, or one
        at the end of an epoch `eval_every_epochs` skips, is kept as `last`, for resuming, and its
        meta says `"evaluated": false`). Weights that are not finite stop the run instead."""
        from surgery.recipe import recipe_hash

        check_finite_weights(self.model, state.step, self.recipe.train.precision)
        meta = {
            "epoch": state.epoch,
            "step": state.step,
            "batch_in_epoch": state.batch,
            "metrics": state.metrics,
            "evaluated": evaluated,
            "recipe_sha256": recipe_hash(self.recipe, portable=True),
        }
        c = self.recipe.train.checkpoint
        path = None
        if self.placement.is_main:  # one writer; the other ranks wait until the checkpoint is complete
            path = ckpt.save_checkpoint(
                self.run_dir,
                model=self.model,
                trainer_state=self._trainer_state(state),
                meta=meta,
                recipe_text=self.recipe_text,
                monitor=c.monitor if evaluated else None,
                mode=c.mode,
                keep_best=c.keep_best,
                reference=self.reference,
            )
        self.placement.barrier()
        self.saved, self.last = True, path
        return path

    def restore(self, *, force: bool, progress: Progress) -> tuple[TrainState, dict[str, Any]]:
        """Load the last complete checkpoint after checking the resume contract (an unsafe recipe
        change is refused unless `force`); the RNG state is returned to be applied last, right
        before training continues."""
        from surgery.freeze import load_freeze_state
        from surgery.recipe import load_recipe_text, recipe_hash

        last = ckpt.find_last(self.run_dir)
        meta = ckpt.read_meta(last)
        if meta.get("recipe_sha256") != recipe_hash(self.recipe, portable=True):
            old = load_recipe_text((last / ckpt.RECIPE_FILE).read_text(), filename=str(last / ckpt.RECIPE_FILE))
            changes = ckpt.check_resume(old, self.recipe, force=force)
            progress.note("resuming with a changed recipe:\n" + "\n".join(changes))
        trainer, meta = ckpt.load_checkpoint(last, self.model)
        load_freeze_state(self.model, _freeze_from(trainer["freeze"], self.model))
        names = [group.get("names") for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(trainer["optimizer"])
        for group, group_names in zip(self.optimizer.param_groups, names, strict=True):
            if group_names is not None:
                group["names"] = group_names
        self.scheduler.load_state_dict(trainer["scheduler"])
        self.scaler.load_state_dict(trainer["scaler"])
        state = TrainState(**trainer["state"])
        progress.note(f"resuming from {last} (epoch {state.epoch + 1}, batch {state.batch}, step {state.step})")
        return state, trainer["rng"]

    def final(self, state: TrainState, *, resumed: bool) -> Path | None:
        """The run's last checkpoint once training ended (rank 0; None elsewhere). A run that saved
        nothing is saved now, unless it was resumed with nothing left to train: its last checkpoint
        already is the final one."""
        if self.saved:
            return self.last
        if resumed:
            return ckpt.find_last(self.run_dir) if self.placement.is_main else None
        return self.save(state, evaluated=any(k.startswith("val/") for k in state.metrics))

    def best(self) -> Path | None:
        """The best checkpoint by `train.checkpoint.monitor` as the index ranks it (rank 0)."""
        index = ckpt.read_index(self.run_dir)
        return self.run_dir / ckpt.CHECKPOINTS / index["best"][0][0] if index.get("best") else None

    def _trainer_state(self, state: TrainState) -> dict[str, Any]:
        from surgery.freeze import freeze_state

        optimizer_state = self.optimizer.state_dict()
        for group in optimizer_state["param_groups"]:
            group.pop("names", None)  # parameter names per group: rebuilt from the recipe, not stored
        trainable = freeze_state(self.model)
        return {
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.rng_state(self.recipe.train.seed),
            # which parameters train, compactly: a mask in parameter order and the digest of the names it follows
            "freeze": {"names_sha256": _names_digest(trainable), "trainable": torch.tensor(list(trainable.values()))},
            "state": dataclasses.asdict(state),
        }


def _names_digest(names: Any) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def _freeze_from(saved: dict[str, Any], model: Any) -> dict[str, bool]:
    """The `freeze_state` a checkpoint recorded (the compact mask, or the older name → bool form)."""
    if "trainable" not in saved:
        return saved
    names = [n for n, _ in model.named_parameters()]
    if _names_digest(names) != saved["names_sha256"]:
        raise ckpt.CheckpointError(
            "the checkpoint's freeze state is for other parameter names; was the recipe's model changed?"
        )
    return dict(zip(names, (bool(b) for b in saved["trainable"].tolist()), strict=True))
