"""The recipe language: typed, documented, closed.

Every model forbids unknown keys; every name that selects behaviour is a key of a registry in
`surgery.registry`; every field has a description, so `surgery schema` documents itself. Defaults
live here and nowhere else. Optional fields default to ``None`` (so a dumped recipe that leaves
them out loads back equal).

Some list items are "one-key mappings" — ``{linear: {out_features: 10}}`` — where the key names
the kind (a layer, a surgery op, an augmentation, a search domain). They are modelled as a model
with one optional field per kind and a check that exactly one is set, so errors carry the natural
path (``heads[0].layers[1].linear.out_features``) and editors complete the kinds.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from surgery.registry import (
    AUGMENTATIONS,
    BACKBONE_SOURCES,
    DATA_SOURCES,
    EXPORT_FORMATS,
    LAYERS,
    LOSSES,
    METRICS,
    OPTIMIZERS,
    SCHEDULERS,
    Registry,
    did_you_mean,
)


class Strict(BaseModel):
    """Base of every recipe model: unknown keys are errors, values are checked on assignment, and
    no number is infinite or NaN."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


def registry_name(registry: Registry) -> Any:
    """A `str` field that must be a key of `registry`; the JSON Schema lists the keys."""

    def check(value: str) -> str:
        if value not in registry:
            raise PydanticCustomError("unknown_name", "{msg}", {"msg": str(registry.unknown(value))})
        return value

    return Annotated[
        str,
        AfterValidator(check),
        WithJsonSchema({"type": "string", "enum": list(registry.names)}),
    ]


BackboneSource = registry_name(BACKBONE_SOURCES)
LossName = registry_name(LOSSES)
MetricName = registry_name(METRICS)
OptimizerName = registry_name(OPTIMIZERS)
SchedulerName = registry_name(SCHEDULERS)
DataSourceName = registry_name(DATA_SOURCES)
ExportFormat = registry_name(EXPORT_FORMATS)

_IDENT = r"^[A-Za-z_][A-Za-z0-9_]*$"
_SLUG = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
_DEVICE = r"^(auto|cpu|mps|cuda(:[0-9]+)?)$"
# Every number has a ceiling far above any real use and far below what overflows or exhausts a
# machine: a recipe that validates can be built.
MAX_COUNT = 2**31 - 1  # counts of steps, epochs, samples, replicas (an int32)
MAX_WIDTH = 2**20  # features, channels, classes, ranks, tokens (a 1M-wide layer is already huge)
MAX_IMAGE_SIDE = 16_384  # pixels per side of an input image
MAX_SEED = 2**32 - 1  # what every RNG the trainer seeds (numpy's included) accepts
PositiveInt = Annotated[int, Field(gt=0, le=MAX_COUNT)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Width = Annotated[int, Field(gt=0, le=MAX_WIDTH)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Probability = Annotated[float, Field(ge=0.0, lt=1.0)]


def _glob(value: str) -> str:
    if not value or value.strip() != value:
        raise PydanticCustomError("bad_glob", "a parameter glob must be a non-empty name pattern without spaces")
    if not re.fullmatch(r"[A-Za-z0-9_.*?\[\]!-]+", value):
        raise PydanticCustomError(
            "bad_glob", "{msg}", {"msg": f"{value!r} is not a parameter glob (letters, digits, _ . * ? [ ] only)"}
        )
    return value


ParamGlob = Annotated[str, AfterValidator(_glob)]


class OneOf(Strict):
    """A one-key mapping: exactly one of the optional fields is set (see module docstring)."""

    registry: ClassVar[Registry | None] = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # `- relu` and `- relu:` (null) both mean `- relu: {}`.
        if isinstance(data, str):
            data = {data: {}}
        if isinstance(data, dict):
            data = {k: ({} if v is None and cls._takes_params(k) else v) for k, v in data.items()}
            registry = cls.registry
            unknown = [k for k in data if k not in cls.model_fields]
            if registry is not None and unknown:
                raise PydanticCustomError("unknown_name", "{msg}", {"msg": str(registry.unknown(str(unknown[0])))})
            if len(data) != 1:
                kinds = ", ".join(sorted(cls.model_fields))
                raise PydanticCustomError(
                    "one_key",
                    "{msg}",
                    {"msg": f"expected a mapping with exactly one key, one of: {kinds}; got {len(data)} keys"},
                )
        return data

    @classmethod
    def _takes_params(cls, key: Any) -> bool:
        field = cls.model_fields.get(key) if isinstance(key, str) else None
        return field is not None and "Params" in str(field.annotation)

    @property
    def kind(self) -> str:
        return next(k for k in type(self).model_fields if getattr(self, k) is not None)

    @property
    def params(self) -> Any:
        return getattr(self, self.kind)


# --------------------------------------------------------------------------- layers


class NoParams(Strict):
    """A layer with no settings (`- relu`, `- relu: {}`)."""


class LinearParams(Strict):
    out_features: Width = Field(description="Output size; `in_features` is inferred from what feeds the layer.")
    bias: bool = Field(True, description="Learn an additive bias.")


class MLPParams(Strict):
    hidden: list[Width] = Field(description="Sizes of the hidden layers, in order.")
    out_features: Width = Field(description="Output size of the last layer.")
    activation: Literal["relu", "gelu", "silu", "tanh"] = Field("gelu", description="Activation between layers.")
    norm: Literal["none", "layernorm", "batchnorm"] = Field(
        "none", description="Normalisation after each hidden layer."
    )
    dropout: Probability = Field(0.0, description="Dropout after each hidden activation.")


class DropoutParams(Strict):
    p: Probability = Field(0.1, description="Probability of zeroing an element during training.")


class NormParams(Strict):
    eps: float = Field(1e-5, gt=0, description="Added to the variance for numerical stability.")


class Conv1x1Params(Strict):
    out_channels: Width = Field(description="Output channels; `in_channels` is inferred.")
    bias: bool = Field(True, description="Learn an additive bias.")


class LayerSpec(OneOf):
    """One layer of a head (or the replacement in a `replace` op): `{linear: {out_features: 10}}`."""

    registry: ClassVar[Registry | None] = LAYERS

    linear: LinearParams | None = Field(None, description=LAYERS.docs["linear"])
    mlp: MLPParams | None = Field(None, description=LAYERS.docs["mlp"])
    dropout: DropoutParams | None = Field(None, description=LAYERS.docs["dropout"])
    layernorm: NormParams | None = Field(None, description=LAYERS.docs["layernorm"])
    batchnorm: NormParams | None = Field(None, description=LAYERS.docs["batchnorm"])
    relu: NoParams | None = Field(None, description=LAYERS.docs["relu"])
    gelu: NoParams | None = Field(None, description=LAYERS.docs["gelu"])
    silu: NoParams | None = Field(None, description=LAYERS.docs["silu"])
    tanh: NoParams | None = Field(None, description=LAYERS.docs["tanh"])
    sigmoid: NoParams | None = Field(None, description=LAYERS.docs["sigmoid"])
    identity: NoParams | None = Field(None, description=LAYERS.docs["identity"])
    conv1x1: Conv1x1Params | None = Field(None, description=LAYERS.docs["conv1x1"])
    avgpool: NoParams | None = Field(None, description=LAYERS.docs["avgpool"])
    maxpool: NoParams | None = Field(None, description=LAYERS.docs["maxpool"])
    flatten: NoParams | None = Field(None, description=LAYERS.docs["flatten"])


assert set(LayerSpec.model_fields) == set(LAYERS.names), "LayerSpec and the LAYERS registry disagree"


# --------------------------------------------------------------------------- backbone

# Keyword arguments that are plumbing (where weights come from, downloads, trust), not model
# hyperparameters: each is refused in `backbone.kwargs` with the field that does its job instead.
_WEIGHTS = (
    "set `backbone.pretrained: true` (the zoo's weights) or `backbone.weights:` (a local file, pinned by `sha256:`)"
)
PLUMBING_KWARGS: dict[str, str] = {
    "trust_remote_code": "remote code is never run: a recipe is data, never code",
    "code_revision": "remote code is never run: a recipe is data, never code",
    "pretrained": _WEIGHTS,
    "weights": _WEIGHTS,
    "weights_backbone": _WEIGHTS,
    "checkpoint_path": _WEIGHTS,
    "pretrained_cfg": _WEIGHTS,
    "pretrained_cfg_overlay": _WEIGHTS,
    "pretrained_model_name_or_path": "set `backbone.name` (a hub id or a local folder)",
    "model_name": "set `backbone.name`",
    "state_dict": _WEIGHTS,
    "from_tf": _WEIGHTS,
    "from_flax": _WEIGHTS,
    "use_safetensors": _WEIGHTS,
    "variant": _WEIGHTS,
    "subfolder": "point `backbone.weights:` at the model folder itself",
    "revision": "set `backbone.revision`",
    "progress": "downloads are the zoo's business; progress is not a model setting",
    "cache_dir": "the zoo's cache is set by the environment (HF_HOME, HF_HUB_CACHE, TORCH_HOME)",
    "force_download": "the zoo's cache is set by the environment (HF_HOME, HF_HUB_CACHE, TORCH_HOME)",
    "resume_download": "the zoo's cache is set by the environment (HF_HOME, HF_HUB_CACHE, TORCH_HOME)",
    "proxies": "network settings come from the environment (HTTPS_PROXY)",
    "token": "log in where the run happens (`hf auth login` or HF_TOKEN); a token never goes in a recipe",
    "use_auth_token": "log in where the run happens (`hf auth login` or HF_TOKEN); a token never goes in a recipe",
    "local_files_only": "set HF_HUB_OFFLINE=1, or point `backbone.name`/`weights:` at a local folder",
    "features_only": "heads read multi-scale features with `input: features` and `feature_index`",
    "out_indices": "heads read multi-scale features with `input: features` and `feature_index`",
    "torch_dtype": "set `train.precision`",
    "dtype": "set `train.precision`",
    "device": "set `placement.device`",
    "device_map": "set `placement` (strategy, device, stages)",
    "low_cpu_mem_usage": "loading is the zoo's business, not a model setting",
    "offload_folder": "set `placement` (strategy, device, stages)",
    "quantization_config": "quantisation is not a recipe setting",
    "load_in_8bit": "quantisation is not a recipe setting",
    "load_in_4bit": "quantisation is not a recipe setting",
}


def _model_kwarg(key: str) -> str:
    instead = PLUMBING_KWARGS.get(key) or (
        PLUMBING_KWARGS["pretrained_cfg"] if key.startswith("pretrained_cfg") else None
    )
    if key.startswith("_"):
        instead = "private arguments of the zoo are not model settings"
    if instead is not None:
        raise PydanticCustomError(
            "plumbing_kwarg",
            "{msg}",
            {"msg": f"{key!r} is not a model hyperparameter and is not accepted in kwargs; {instead}"},
        )
    return key


class Backbone(Strict):
    """The pretrained network heads are put on."""

    source: BackboneSource = Field(description="Which model zoo builds it: " + BACKBONE_SOURCES.describe())
    name: str = Field(
        min_length=1,
        description="Model name in that zoo (timm/torchvision name, or a Hugging Face hub id or local folder for transformers).",
    )
    pretrained: bool = Field(
        True,
        description="Start from trained weights: `weights:` when given, else the model folder (a local folder or `package:` model), else the zoo's hub/cache (needs the network unless cached). `false` asks for random initialisation.",
    )
    weights: str | None = Field(
        None,
        description="Local weights file (.safetensors; .pt/.pth/.bin are read with torch.load(weights_only=True)) or, for transformers, a local model folder. Relative to the recipe file.",
    )
    sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")] | None = Field(
        None, description="Expected sha256 of the `weights` file; a mismatch is an error."
    )
    strict: bool = Field(
        True,
        description="Refuse weights whose keys or shapes don't match (the classifier is the only tolerated mismatch).",
    )
    kwargs: dict[Annotated[str, AfterValidator(_model_kwarg)], bool | int | float | str | list[int] | list[float]] = (
        Field(
            default_factory=dict,
            description="Model hyperparameters for the zoo's constructor (e.g. `in_chans`, `drop_path_rate`), checked by the zoo at build time. Plumbing (`pretrained`, `checkpoint_path`, `trust_remote_code`, `cache_dir`, `token`, `revision`, ...) is refused: the recipe's own fields do those jobs.",
        )
    )
    revision: str | None = Field(None, description="Hugging Face revision (branch, tag or commit) for hub ids.")


class InputOverride(Strict):
    """Overrides for the input spec the backbone's pretrained config provides."""

    size: Annotated[list[Annotated[int, Field(gt=0, le=MAX_IMAGE_SIDE)]], Field(min_length=2, max_length=2)] | None = (
        Field(None, description="Input image size [height, width].")
    )
    channels: Width | None = Field(None, description="Input image channels (set by `input_channels` surgery too).")
    mean: list[float] | None = Field(None, description="Per-channel normalisation mean.")
    std: list[Annotated[float, Field(gt=0)]] | None = Field(None, description="Per-channel normalisation std.")
    max_length: Width | None = Field(None, description="Token limit for text inputs.")


# --------------------------------------------------------------------------- surgery ops


class ReplaceOp(Strict):
    module: str = Field(
        min_length=1,
        description="Dotted module name inside the backbone (as `surgery plan` prints it, without `backbone.`).",
    )
    layer: LayerSpec = Field(description="The allowlisted layer put in its place.")


class LoraOp(Strict):
    targets: list[ParamGlob] = Field(
        min_length=1,
        description="Globs over backbone module names whose Linear/Conv layers get LoRA adapters (e.g. `encoder.layer.*.attention.self.query`).",
    )
    r: Width = Field(8, description="Rank of the adapter.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator (the update is scaled by alpha / r).")
    dropout: Probability = Field(0.0, description="Dropout on the adapter's input.")


class SurgeryOp(OneOf):
    """One module operation on the backbone, applied in order: `{remove: fc}`."""

    replace: ReplaceOp | None = Field(None, description="Put an allowlisted layer in place of a module.")
    remove: str | None = Field(None, description="Replace a module with Identity.")
    truncate: str | None = Field(
        None, description="Drop every module after this one (the backbone's output becomes this module's output)."
    )
    input_channels: Width | None = Field(
        None,
        description="Adapt the first convolution to N input channels, adapting its pretrained weights as timm does.",
    )
    reinit: str | None = Field(
        None,
        description="Re-initialise a module's parameters (discard pretrained weights there) with the model's own initialisation (timm/torchvision: as a fresh model starts, e.g. timm's zero-initialised last BatchNorm of each residual block; otherwise PyTorch's `reset_parameters`).",
    )
    lora: LoraOp | None = Field(
        None, description="Add LoRA adapters (via peft) to the matched modules; they are merged on export."
    )

    @classmethod
    def _takes_params(cls, key: Any) -> bool:
        return key in ("replace", "lora")


# --------------------------------------------------------------------------- heads


class LossSpec(Strict):
    name: LossName = Field(description="Loss function: " + LOSSES.describe())
    weight: float = Field(1.0, ge=0, description="Weight of this head's loss in the total.")
    label_smoothing: Probability = Field(0.0, description="Label smoothing (cross_entropy only).")

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data


class Head(Strict):
    """A named output: a tap on the backbone, a stack of layers, a loss and metrics."""

    name: Annotated[str, Field(pattern=_IDENT)] = Field(description="Head name; its parameters are `heads.<name>.*`.")
    input: Literal["logits", "pooled", "tokens", "features"] = Field(
        "pooled",
        description="What the head reads: `logits` (the backbone's own output, classifier included), `pooled` (features before the classifier), `tokens` (transformer sequence output, pooled by `pool`), `features` (a multi-scale feature map, chosen by `feature_index`).",
    )
    pool: Literal["cls", "mean", "none"] = Field(
        "mean",
        description="For `input: tokens`: take the CLS token, mean over the attention mask, or keep the sequence (`none`).",
    )
    feature_index: Annotated[int, Field(ge=-1024, le=1024)] = Field(
        -1,
        description="For `input: features`: which feature map (timm `features_only` order; negative counts from the end).",
    )
    layers: list[LayerSpec] = Field(min_length=1, description="Layers applied in order to the tap.")
    loss: LossSpec = Field(description="Training loss: a name, or `{name, weight, label_smoothing}`.")
    metrics: list[MetricName] = Field(default_factory=list, description="Validation metrics: " + METRICS.describe())
    labels: list[str] | None = Field(None, description="Class names, in output order (served with predictions).")
    target: str | None = Field(
        None, description="Label column (data) that trains this head; default: `data.label_column`."
    )
    init: Literal["default", "zeros", "xavier_uniform", "kaiming_normal", "trunc_normal"] = Field(
        "default", description="Initialisation of the head's layers."
    )


# --------------------------------------------------------------------------- placement


_MODULE_PATH = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*"
_STAGE_ENTRY = rf"{_MODULE_PATH}(\.\.{_MODULE_PATH})?"


def _stage_entry(value: str) -> str:
    if not re.fullmatch(_STAGE_ENTRY, value):
        raise PydanticCustomError(
            "bad_stage_entry",
            "{msg}",
            {
                "msg": f"{value!r} is not a module path (`backbone.layer1`) or a range (`backbone.layer1..backbone.layer3`)"
            },
        )
    return value


def _strategy(value: Any) -> Any:
    if value == "data_parallel":
        raise PydanticCustomError(
            "refused_strategy",
            "data_parallel (single-process nn.DataParallel) is refused: `ddp` replaces it, with one process "
            "per device (no GIL contention between devices) and no gathering of every output and gradient "
            "on the first GPU (no memory imbalance); use `strategy: ddp` with `workers: N`",
        )
    return value


class Stage(Strict):
    """One pipeline stage: consecutive modules of the model, on one device."""

    modules: list[Annotated[str, AfterValidator(_stage_entry)]] = Field(
        min_length=1,
        description="Module paths of this stage in forward order, as `surgery plan` prints them: `backbone.conv1`, "
        "a range of sibling modules `backbone.layer1..backbone.layer3`, `heads`, or a parameter a split module "
        "owns directly (`backbone.pos_embed`).",
    )
    device: Annotated[str, Field(pattern=r"^(cpu|mps|cuda(:[0-9]+)?)$")] = Field(
        description="Device of the stage: `cuda:N`, `cpu` or `mps` (`auto` is not: a stage names its device)."
    )


class Placement(Strict):
    """Where the model runs: one device, data parallel (DDP) on local processes or Ray Train, or
    model-parallel pipeline stages."""

    strategy: Annotated[Literal["single", "ddp", "pipeline"], BeforeValidator(_strategy)] = Field(
        "single",
        description="`single` device, `ddp` (DistributedDataParallel over `workers` processes), or `pipeline` "
        "(model-parallel `stages`). `data_parallel` is refused: `ddp` replaces it.",
    )
    device: Annotated[str, Field(pattern=_DEVICE)] = Field(
        "auto",
        description="`single`: `auto` (CUDA if present, else CPU), `cpu`, `cuda`, `cuda:N`, `mps`. "
        "`ddp`: `auto`, `cpu` (Gloo) or `cuda` (NCCL, one GPU per worker).",
    )
    workers: PositiveInt = Field(
        1, description="`ddp` processes (one per GPU; on CPU at most one per core). `data.batch_size` is per worker."
    )
    engine: Literal["local", "ray"] = Field(
        "local",
        description="Where `ddp` workers run: `local` processes launched by `surgery build` (or `torchrun`), or "
        "`ray`: Ray Train (on the cluster `RAY_ADDRESS` names, which also selects `ray` when set).",
    )
    max_failures: Annotated[int, Field(ge=0)] = Field(
        0,
        description="`ddp` with `engine: ray`: worker failures to survive; after one, Ray Train restarts all "
        "workers from the last checkpoint.",
    )
    stages: list[Stage] = Field(
        default_factory=list,
        description="`pipeline`: consecutive stages covering the model in forward order, each on a device.",
    )
    micro_batches: PositiveInt = Field(
        1,
        description="`pipeline`: split each batch into this many micro-batches so stages overlap (GPipe); "
        "gradients accumulate over them.",
    )


# --------------------------------------------------------------------------- data


class FlipParams(Strict):
    p: Probability = Field(0.5, description="Probability of flipping.")


class ResizedCropParams(Strict):
    scale: Annotated[list[Annotated[float, Field(gt=0, le=1)]], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: [0.08, 1.0], description="Range of the crop's area fraction."
    )
    ratio: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: [0.75, 1.3333333333333333], description="Range of the crop's aspect ratio."
    )


class RandomCropParams(Strict):
    padding: Count = Field(4, description="Zero padding added on each side before cropping back to size.")


class RotateParams(Strict):
    degrees: float = Field(15.0, ge=0, le=180, description="Maximum rotation in degrees, either way.")


class ColorJitterParams(Strict):
    brightness: float = Field(0.2, ge=0, description="Brightness jitter factor.")
    contrast: float = Field(0.2, ge=0, description="Contrast jitter factor.")
    saturation: float = Field(0.2, ge=0, description="Saturation jitter factor.")


class NoiseParams(Strict):
    std: float = Field(0.05, gt=0, description="Standard deviation of the noise.")


class Augmentation(OneOf):
    """One training-time augmentation: `{hflip: {p: 0.5}}`."""

    registry: ClassVar[Registry | None] = AUGMENTATIONS

    hflip: FlipParams | None = Field(None, description=AUGMENTATIONS.docs["hflip"])
    vflip: FlipParams | None = Field(None, description=AUGMENTATIONS.docs["vflip"])
    random_resized_crop: ResizedCropParams | None = Field(None, description=AUGMENTATIONS.docs["random_resized_crop"])
    random_crop: RandomCropParams | None = Field(None, description=AUGMENTATIONS.docs["random_crop"])
    rotate: RotateParams | None = Field(None, description=AUGMENTATIONS.docs["rotate"])
    color_jitter: ColorJitterParams | None = Field(None, description=AUGMENTATIONS.docs["color_jitter"])
    gaussian_noise: NoiseParams | None = Field(None, description=AUGMENTATIONS.docs["gaussian_noise"])


assert set(Augmentation.model_fields) == set(AUGMENTATIONS.names), "Augmentation and AUGMENTATIONS disagree"


class Synthetic(Strict):
    num_samples: Annotated[int, Field(gt=0, le=1_000_000)] = Field(
        256, description="Training samples (validation gets a quarter as many); held in memory, at most a million."
    )
    num_classes: Width = Field(10, description="Classes of the random labels (for classification heads).")


class Data(Strict):
    """Where training and validation data come from, and how they are batched."""

    source: DataSourceName = Field(description="Data source: " + DATA_SOURCES.describe())
    train: str | None = Field(
        None,
        description="Training data: a folder (`image_folder`) or file (`csv`, `jsonl`), relative to the recipe file.",
    )
    val: str | None = Field(
        None, description="Validation data; when absent, `val_split` of the training data is held out."
    )
    val_split: float = Field(0.2, gt=0, lt=1, description="Fraction held out for validation when `val` is absent.")
    split_seed: Seed = Field(0, description="Seed of the train/validation split (independent of the training seed).")
    text_column: str | None = Field(
        None, description="Text column (`csv`/`jsonl`), tokenised with the backbone's tokenizer."
    )
    feature_columns: list[str] | None = Field(
        None, description="Numeric feature columns (`csv`/`jsonl`) used as a float vector input."
    )
    label_column: str = Field("label", description="Default label column for heads without a `target`.")
    on_bad_file: Literal["error", "skip"] = Field(
        "error",
        description="`image_folder`: an image that cannot be read stops the build before training (`error`), or is left out (`skip`): counted and listed in the run summary and metrics.jsonl.",
    )
    batch_size: PositiveInt = Field(32, description="Training batch size (per process).")
    eval_batch_size: PositiveInt | None = Field(None, description="Validation batch size; default: `batch_size`.")
    num_workers: Literal["auto"] | Count = Field(
        "auto",
        description="DataLoader worker processes; `auto` is 0 when training on a CPU (the training process loads fastest there) and, with CUDA, 4 per GPU, at most the CPU count minus one.",
    )
    pin_memory: Literal["auto"] | bool = Field(
        "auto", description="Pin host memory for faster copies; `auto` is on when CUDA is used."
    )
    shuffle: bool = Field(True, description="Shuffle the training data each epoch (seeded).")
    drop_last: bool = Field(False, description="Drop the last incomplete training batch.")
    augment: list[Augmentation] = Field(
        default_factory=list, description="Training-time augmentations, applied in order."
    )
    synthetic: Synthetic = Field(default_factory=Synthetic, description="Settings of the `synthetic` source.")
    limit_train: PositiveInt | None = Field(
        None, description="Use at most this many training samples (quick experiments)."
    )
    limit_val: PositiveInt | None = Field(None, description="Use at most this many validation samples.")


# --------------------------------------------------------------------------- training


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
    every_steps: PositiveInt | None = Field(None, description="Also save every N optimizer steps (mid-epoch).")
    every_epoch: bool = Field(True, description="Save at the end of each epoch.")
    keep_best: Count = Field(1, description="Keep the k best checkpoints by `monitor` (plus `last`).")
    monitor: str = Field(
        "val/loss", description="Metric that ranks checkpoints: `val/loss`, `val/<head>/loss` or `val/<head>/<metric>`."
    )
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher `monitor` is better.")


class EarlyStopping(Strict):
    monitor: str = Field("val/loss", description="Metric watched (same names as `checkpoint.monitor`).")
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher is better.")
    patience: PositiveInt = Field(3, description="Epochs without improvement before stopping.")
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


# --------------------------------------------------------------------------- tuning


class Domain(OneOf):
    """A search domain: `{loguniform: [1e-4, 1e-2]}`. Every value it can produce (each listed
    value, both ends of a range) is checked against the schema at its path before a search starts."""

    grid: Annotated[list[Any], Field(min_length=1)] | None = Field(
        None, description="Try every value (grid search; with `search: random` the grid is crossed with samples)."
    )
    choice: Annotated[list[Any], Field(min_length=1)] | None = Field(None, description="Sample one of the values.")
    uniform: Annotated[list[float], Field(min_length=2, max_length=2)] | None = Field(
        None, description="Sample uniformly from [low, high]."
    )
    loguniform: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=2, max_length=2)] | None = Field(
        None, description="Sample log-uniformly from [low, high] (both > 0)."
    )
    randint: Annotated[list[int], Field(min_length=2, max_length=2)] | None = Field(
        None, description="Sample an integer from [low, high) (high excluded)."
    )
    quniform: Annotated[list[float], Field(min_length=3, max_length=3)] | None = Field(
        None, description="Sample uniformly from [low, high] in steps of q from low: `[low, high, q]`."
    )

    @classmethod
    def _takes_params(cls, key: Any) -> bool:
        return False

    @model_validator(mode="after")
    def _ordered(self) -> Domain:
        kind = self.kind
        if kind in ("uniform", "loguniform", "randint", "quniform"):
            low, high = self.params[0], self.params[1]
            if not low < high:
                raise PydanticCustomError("bad_range", "{msg}", {"msg": f"{kind}: low {low} must be below high {high}"})
            if kind == "randint" and high - low < 1:
                raise PydanticCustomError("bad_range", "randint: the range [low, high) is empty")
            if kind == "quniform" and not 0 < self.params[2] <= high - low:
                raise PydanticCustomError(
                    "bad_range",
                    "{msg}",
                    {"msg": f"quniform: q must be > 0 and at most high - low, got {self.params[2]}"},
                )
        return self


class TrialResources(Strict):
    """What one trial holds while it runs (Ray resources); concurrency follows from them."""

    cpus: Annotated[float, Field(gt=0)] = Field(1.0, description="CPU cores per trial (its torch threads).")
    gpus: Annotated[float, Field(ge=0)] = Field(
        0.0, description="GPUs per trial; a fraction (0.25) shares one GPU between trials."
    )


class Tune(Strict):
    """Hyperparameter search with Ray Tune (`surgery tune`): each trial is one `fit` of the recipe
    with the trial's values set at the space's paths, in its own run folder."""

    search: Literal["grid", "random", "bohb", "optuna"] = Field(
        "random",
        description="`grid` (every combination of `grid` domains), `random`, `bohb` (Bayesian optimisation + "
        "HyperBand: TuneBOHB with HyperBandForBOHB) or `optuna` (TPE).",
    )
    space: dict[str, Domain] = Field(min_length=1, description="Recipe paths (as for `--set`) → search domains.")
    metric: str = Field("val/loss", description="Metric to optimise (same names as `checkpoint.monitor`).")
    mode: Literal["min", "max"] | None = Field(
        None, description="Minimise or maximise `metric`; default: `min` for a loss, `max` for any other metric."
    )
    num_samples: PositiveInt | None = Field(
        None, description="Trials; for `grid`, repeats of the whole grid. Default: 1 for `grid`, else 8."
    )
    max_concurrent: PositiveInt | None = Field(
        None, description="Trials run at once; default (and upper bound): as many as the resources allow."
    )
    scheduler: Literal["none", "asha", "hyperband"] | None = Field(
        None,
        description="Trial scheduler that stops (or pauses) poor trials at epoch milestones: `asha`, `hyperband`, "
        "or `none`. Default: `hyperband` for `bohb` (HyperBandForBOHB, the only one it runs with), else `none`.",
    )
    grace_period: PositiveInt = Field(1, description="`asha`: epochs every trial runs before it can be stopped.")
    reduction_factor: Annotated[float, Field(gt=1)] = Field(
        3.0, description="`asha`/`hyperband`: 1/reduction_factor of the trials go on at each milestone."
    )
    time_budget_s: Annotated[float, Field(gt=0)] | None = Field(
        None, description="Stop starting and running trials after this many seconds (finished trials count)."
    )
    resources: TrialResources = Field(default_factory=TrialResources, description="Resources one trial holds.")
    seed: int | None = Field(0, description="Seed of the search algorithm (null: a different search each time).")
    export_best: bool = Field(True, description="Export the best trial's bundle into its run folder.")


# --------------------------------------------------------------------------- export & serve


class Export(Strict):
    """Formats written into the bundle at the end of `surgery build` (and by `surgery export`)."""

    formats: list[ExportFormat] = Field(
        default_factory=lambda: ["safetensors"], description="Formats: " + EXPORT_FORMATS.describe()
    )
    opset: PositiveInt | None = Field(None, description="ONNX opset; default: the exporter's.")
    tolerance: float = Field(
        1e-4, gt=0, description="Maximum abs difference between an exported format and eager PyTorch."
    )
    dynamic_batch: bool = Field(True, description="Exported graphs accept any batch size.")


class Autoscaling(Strict):
    min_replicas: Count = Field(1, description="Fewest replicas.")
    max_replicas: PositiveInt = Field(2, description="Most replicas.")
    target_ongoing_requests: PositiveInt = Field(
        8, description="Requests in flight per replica that autoscaling aims for."
    )


class Serve(Strict):
    """Defaults for `surgery serve` (each can be overridden on the command line)."""

    max_batch_size: PositiveInt = Field(16, description="Largest batch dynamic batching forms.")
    batch_wait_ms: float = Field(2.0, ge=0, description="How long a batch waits to fill after its first request.")
    replicas: Literal["auto"] | PositiveInt = Field(
        "auto",
        description="Replicas of the model (ignored when `autoscaling` is set). `auto`: one per CPU core, at most 4, "
        "each using one core's worth of torch threads (on a CPU this gave more throughput and no worse latency "
        "than one replica using every core).",
    )
    autoscaling: Autoscaling | None = Field(None, description="Ray Serve autoscaling instead of a fixed replica count.")
    max_ongoing_requests: PositiveInt = Field(
        64, description="Requests a replica accepts at once (high enough for batches to fill)."
    )
    max_body_mb: float = Field(4.0, gt=0, description="Largest request body accepted, in MB.")
    request_timeout_s: float = Field(30.0, gt=0, description="Request timeout in seconds.")
    top_k: PositiveInt = Field(5, description="Labels returned per classification head.")


# --------------------------------------------------------------------------- the recipe


class Recipe(Strict):
    """A `surgery` recipe: what model to build, how to train, export and serve it."""

    # The folder of the recipe file it was loaded from (not a field: a recipe is the same recipe
    # wherever it lies); paths are hashed relative to it for the resume contract.
    _source_dir: str | None = PrivateAttr(None)
    # Where each file of the extends chain came from (set by surgery.recipe, for the lock file).
    _provenance: Any = PrivateAttr(None)

    def __eq__(self, other: object) -> bool:
        # Equal recipes are equal wherever their files lie: compare fields, not the source folder.
        if not isinstance(other, Recipe):
            return NotImplemented
        return self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]  # mutable, like every recipe model

    name: Annotated[str, Field(pattern=_SLUG)] = Field(
        description="Recipe name; run folders are `runs/<name>/<run-id>`."
    )
    description: str = Field("", description="What this recipe is for.")
    tags: list[Annotated[str, Field(pattern=_SLUG)]] | None = Field(
        None, description="Keywords for `surgery recipes list --tag`."
    )
    version: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")] | None = Field(
        None,
        description="Version of this recipe in a library (`name@version` picks it); not inherited through `extends`.",
    )
    extends: str | list[str] | None = Field(
        None,
        description="Base recipe(s) deep-merged under this one: a path relative to this file, a library name (`quickstart`), or `name@version` from a configured library. Mappings merge; lists and scalars replace. Empty after loading.",
    )
    backbone: Backbone = Field(description="The pretrained network.")
    input: InputOverride | None = Field(None, description="Overrides of the input spec the backbone provides.")
    surgery: list[SurgeryOp] = Field(
        default_factory=list, description="Module operations on the backbone, applied in order."
    )
    heads: list[Head] = Field(min_length=1, description="Named heads (multi-task: one loss each, summed by weight).")
    freeze: list[ParamGlob] = Field(
        default_factory=list,
        description="Globs of parameters to freeze (`backbone.**`). `*` matches within one name part, `**` across parts.",
    )
    unfreeze: list[ParamGlob] = Field(
        default_factory=list,
        description="Globs of parameters to keep trainable; applied after `freeze` (the last matching rule wins).",
    )
    placement: Placement = Field(default_factory=Placement, description="Devices and parallelism.")
    data: Data | None = Field(None, description="Training data (required by `surgery build`).")
    train: Train = Field(default_factory=Train, description="Training loop settings.")
    monitor: Monitor = Field(default_factory=Monitor, description="Logging and progress.")
    tune: Tune | None = Field(None, description="Hyperparameter search (`surgery tune`).")
    export: Export = Field(default_factory=Export, description="Exported formats.")
    serve: Serve = Field(default_factory=Serve, description="Serving defaults.")


class Problem(NamedTuple):
    """A validation problem at a field path (tuple of keys and indices)."""

    path: tuple[str | int, ...]
    message: str


def metric_keys(recipe: Recipe) -> list[str]:
    """Every metric name `fit` reports, in the form `monitor` fields use."""
    keys = ["val/loss", "train/loss"]
    for head in recipe.heads:
        keys.append(f"val/{head.name}/loss")
        keys.extend(f"val/{head.name}/{m}" for m in head.metrics)
    return keys


def cross_check(recipe: Recipe) -> list[Problem]:
    """Checks that span fields (run after each field validated on its own)."""
    problems: list[Problem] = []
    seen: set[str] = set()
    for i, head in enumerate(recipe.heads):
        if head.name in seen:
            problems.append(Problem(("heads", i, "name"), f"duplicate head name {head.name!r}"))
        seen.add(head.name)
        if head.loss.label_smoothing and head.loss.name != "cross_entropy":
            problems.append(
                Problem(("heads", i, "loss", "label_smoothing"), "label_smoothing applies to cross_entropy only")
            )
    keys = metric_keys(recipe)

    def check_metric(path: tuple[str | int, ...], value: str) -> None:
        if value not in keys:
            problems.append(
                Problem(
                    path, f"unknown metric {value!r}{did_you_mean(value, keys)}; reported metrics are {', '.join(keys)}"
                )
            )

    check_metric(("train", "checkpoint", "monitor"), recipe.train.checkpoint.monitor)
    if recipe.train.early_stopping is not None:
        check_metric(("train", "early_stopping", "monitor"), recipe.train.early_stopping.monitor)
    if recipe.tune is not None:
        check_metric(("tune", "metric"), recipe.tune.metric)
        problems.extend(_tune_problems(recipe.tune))
    problems.extend(_placement_problems(recipe.placement))
    if recipe.data is not None and recipe.data.source in ("image_folder", "csv", "jsonl") and not recipe.data.train:
        problems.append(Problem(("data", "train"), f"data source {recipe.data.source!r} needs a `train` path"))
    return problems


def _placement_problems(placement: Placement) -> list[Problem]:
    """Placement fields that only mean something for another strategy are errors, not ignored."""
    problems: list[Problem] = []
    strategy = placement.strategy

    def refuse(key: str, message: str) -> None:
        problems.append(Problem(("placement", key), message))

    if strategy == "pipeline":
        if len(placement.stages) < 2:
            refuse("stages", "strategy 'pipeline' needs at least two stages")
        if placement.engine == "ray":
            refuse("engine", "a pipeline runs in one process; `engine: ray` applies to `ddp`")
    elif placement.stages:
        refuse("stages", f"stages apply to strategy 'pipeline', not {strategy!r}")
    if strategy != "pipeline" and placement.micro_batches != 1:
        refuse("micro_batches", f"micro_batches apply to strategy 'pipeline', not {strategy!r}")
    if strategy != "ddp":
        if placement.workers != 1:
            refuse("workers", f"workers apply to strategy 'ddp', not {strategy!r}")
        if placement.max_failures:
            refuse("max_failures", f"max_failures apply to strategy 'ddp', not {strategy!r}")
        if strategy == "single" and placement.engine == "ray":
            refuse(
                "engine", "`engine: ray` runs `ddp` workers on Ray Train; use `strategy: ddp` (`workers: 1` for one)"
            )
    elif placement.max_failures and placement.engine != "ray":
        refuse(
            "max_failures",
            "worker restarts need `engine: ray` (Ray Train restarts them from the last checkpoint); "
            "a local ddp run that fails continues with `surgery build --resume`",
        )
    if strategy == "ddp" and re.fullmatch(r"cuda:[0-9]+|mps", placement.device):
        refuse("device", f"ddp gives each worker its own GPU; use `cuda`, `cpu` or `auto`, not {placement.device!r}")
    return problems


def _tune_problems(tune: Tune) -> list[Problem]:
    """Domains and schedulers the chosen search algorithm cannot carry out."""
    problems: list[Problem] = []
    for path, domain in tune.space.items():
        where = ("tune", "space", path)
        if tune.search == "grid" and domain.kind != "grid":
            problems.append(
                Problem(where, f"search 'grid' tries listed values only; write `grid: [...]` here (got {domain.kind})")
            )
        if tune.search in ("bohb", "optuna") and domain.kind == "grid":
            problems.append(
                Problem(where, f"search {tune.search!r} samples its own points; use `choice` instead of `grid`")
            )
    if tune.search == "bohb" and tune.scheduler not in (None, "hyperband"):
        problems.append(
            Problem(("tune", "scheduler"), "search 'bohb' runs with its own HyperBand (HyperBandForBOHB); drop this")
        )
    return problems


def _accepts(cls: type[BaseModel], value: Any) -> bool:
    try:
        cls.model_validate(value)
    except ValueError:
        return False
    return True


def json_schema() -> dict[str, Any]:
    """The JSON Schema of recipes, for editors."""
    schema = Recipe.model_json_schema()
    defs = schema.get("$defs", {})
    # Shorthands the validators accept (`loss: mse`, `- relu`) are valid YAML for editors too.
    shorthands = {LossSpec: list(LOSSES.names)}
    for cls in (LayerSpec, SurgeryOp, Augmentation):
        shorthands[cls] = [k for k in cls.model_fields if _accepts(cls, k)]
    for cls, names in shorthands.items():
        if cls.__name__ in defs and names:
            defs[cls.__name__] = {
                "anyOf": [
                    defs[cls.__name__],
                    {"type": "string", "enum": names, "description": "Shorthand: a name alone."},
                ]
            }
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "surgery recipe"
    return schema
