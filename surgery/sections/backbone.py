"""`backbone:` (the pretrained network, and the constructor arguments it may take) and `input:`."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

from surgery.registry import BACKBONE_SOURCES
from surgery.sections.base import MAX_IMAGE_SIDE, BackboneSource, Strict, Width

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
