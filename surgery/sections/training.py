"""`train:` (the loop: optimizer, schedule, checkpoints, early stopping, unfreezing, caching) and
`monitor:` (what the run logs)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from surgery.registry import OPTIMIZERS, SCHEDULERS
from surgery.sections.base import Count, OptimizerName, ParamGlob, PositiveInt, SchedulerName, Seed, Strict


class Optimizer(Strict):
    name: OptimizerName = Field("adamw", description="Optimizer: " + OPTIMIZERS.describe())
    lr: float = Field(1e-3, gt=0, description="Base learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (decoupled for adamw).")
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum (sgd, rmsprop).")
    nesterov: bool = Field(False, description="Nesterov momentum (sgd).")
    betas: Annotated[list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: [0.9, 0.999], description="Adam betas."
    )
    eps: float = Field(1e-8, gt=0, description="Adam/RMSprop epsilon.")


class Scheduler(Strict):
    name: SchedulerName = Field("constant", description="Learning-rate schedule: " + SCHEDULERS.describe())
    warmup_steps: Count = Field(0, description="Linear warmup from 0 over this many optimizer steps.")
    min_lr: float = Field(0.0, ge=0, description="Final learning rate for `cosine` and `linear`.")
    step_epochs: PositiveInt = Field(10, description="Epochs between decays for `step`.")
    gamma: float = Field(0.1, gt=0, description="Decay factor for `step`.")


class LrGroup(Strict):
    params: ParamGlob = Field(description="Glob over parameter names (`backbone.**`).")
    lr_scale: float = Field(
        gt=0, description="Multiplier of the base learning rate for these parameters (last matching group wins)."
    )


class UnfreezeAt(Strict):
    epoch: Count = Field(description="Epoch (0-based) at whose start these parameters become trainable.")
    params: ParamGlob = Field(description="Glob over parameter names to unfreeze.")
    lr_scale: float = Field(1.0, gt=0, description="Learning-rate multiplier of the newly trainable parameters.")


class Checkpointing(Strict):
    every_steps: PositiveInt | None = Field(
        None,
        description="Also save every N optimizer steps (mid-epoch): for resuming; never ranked by `keep_best`, since "
        "nothing evaluated them.",
    )
    every_epoch: bool = Field(True, description="Save at the end of each epoch.")
    keep_best: Count = Field(
        1,
        description="Keep the k best checkpoints by `monitor`, among those saved right after a validation (plus `last`).",
    )
    monitor: str = Field(
        "val/loss", description="Metric that ranks checkpoints: `val/loss`, `val/<head>/loss` or `val/<head>/<metric>`."
    )
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher `monitor` is better.")


class EarlyStopping(Strict):
    monitor: str = Field("val/loss", description="Metric watched (same names as `checkpoint.monitor`).")
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher is better.")
    patience: PositiveInt = Field(
        3,
        description="Epochs without improvement before stopping (epochs, not evaluations: with `eval_every_epochs: 2` "
        "each evaluation without improvement spends 2).",
    )
    min_delta: float = Field(0.0, ge=0, description="Smallest change that counts as an improvement.")


def _on_off(value: Any) -> Any:
    # YAML 1.1 reads unquoted on/off as booleans; a switch written `on` means "on".
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class Train(Strict):
    """The training loop's settings."""

    epochs: PositiveInt = Field(10, description="Number of epochs.")
    max_steps: PositiveInt | None = Field(
        None, description="Stop after this many optimizer steps, whatever `epochs` says."
    )
    seed: Seed = Field(
        0, description="Seed of weights init, data order and augmentations; CPU runs are bit-reproducible."
    )
    optimizer: Optimizer = Field(default_factory=Optimizer, description="Optimizer and its settings.")
    scheduler: Scheduler = Field(default_factory=Scheduler, description="Learning-rate schedule.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="`fp32`; `bf16` autocast (CPU or CUDA); `fp16` autocast with GradScaler (CUDA)."
    )
    accumulate: PositiveInt = Field(1, description="Micro-batches per optimizer step (gradient accumulation).")
    clip_grad_norm: Annotated[float, Field(gt=0)] | None = Field(
        None, description="Clip the global gradient norm to this value."
    )
    lr_groups: list[LrGroup] = Field(
        default_factory=list, description="Per-parameter-group learning-rate scales, by glob."
    )
    unfreeze_at: list[UnfreezeAt] = Field(
        default_factory=list, description="Gradual unfreezing: parameters that become trainable at an epoch."
    )
    frozen_batchnorm: Literal["eval", "train"] = Field(
        "eval",
        description="BatchNorm layers whose parameters are all frozen stay in eval mode (running stats untouched) unless `train`.",
    )
    checkpoint: Checkpointing = Field(
        default_factory=Checkpointing, description="When checkpoints are saved and which are kept."
    )
    early_stopping: EarlyStopping | None = Field(None, description="Stop when the monitored metric stops improving.")
    eval_every_epochs: PositiveInt = Field(1, description="Validate every N epochs (always after the last).")
    cache_features: Annotated[Literal["auto", "on", "off"], BeforeValidator(_on_off)] = Field(
        "auto",
        description="Compute what the heads read from a frozen backbone once and train the heads on it: `auto` "
        "when that is exact (nothing before the heads' taps trains, no random augmentation or dropout before "
        "them), `on` to insist (an error saying why when it isn't exact), `off` never. The cache lives in the "
        "run folder and is dropped when `unfreeze_at` unfreezes a part before a tap. (Unquoted `on`/`off`, which "
        "YAML reads as true/false, mean `on`/`off`.)",
    )


class WandB(Strict):
    """Weights & Biases logging: the same scalars, images and summary as TensorBoard."""

    project: Annotated[str, Field(min_length=1)] = Field(description="W&B project the run is logged to.")
    mode: Literal["auto", "online", "offline"] = Field(
        "auto",
        description="`online` syncs as it runs; `offline` writes the run under `<run>/wandb/` for `wandb sync`; "
        "`auto` is online when an API key is configured (WANDB_API_KEY or `wandb login`), else offline.",
    )


class Monitor(Strict):
    """What the run logs (TensorBoard under the run folder, and metrics.jsonl)."""

    tensorboard: bool = Field(True, description="Write TensorBoard event files to `tb/`.")
    log_every_steps: PositiveInt = Field(10, description="Log training scalars every N optimizer steps.")
    histograms: bool = Field(True, description="Log histograms of trainable weights and their gradients each epoch.")
    graph: bool = Field(True, description="Log the model graph once.")
    sample_predictions: Count = Field(
        8, description="Validation images logged with their predictions each epoch (image data)."
    )
    progress: Literal["auto", "rich", "plain", "none"] = Field(
        "auto", description="Progress display: rich bars on a terminal (`auto`), plain lines, or nothing."
    )
    wandb: WandB | None = Field(
        None, description="Also log to Weights & Biases (needs the `wandb` extra: `pip install surgery[wandb]`)."
    )
