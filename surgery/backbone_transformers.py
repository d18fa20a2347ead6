"""The `transformers` zoo: `AutoModel` hub ids, local folders and `package:` folders, with `tokens`
and `pooled` taps. Remote code is never enabled."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from torch import Tensor, nn

from surgery.backbone_contract import ZOO_VALUE_ERRORS, BuiltBackbone, Taps, kwargs_error
from surgery.backbone_hub import hf_endpoint, host_reachable, hub_errors, is_offline, offline_error
from surgery.backbone_weights import (
    PACKAGE_PREFIX,
    check_weights_choice,
    load_state_into,
    package_model_dir,
    read_state_dict,
)
from surgery.errors import BuildError
from surgery.inputs import InputSpec
from surgery.registry import BACKBONE_SOURCES, did_you_mean
from surgery.schema import Backbone


class TransformersTaps(Taps):
    kinds = ("tokens", "pooled")

    def prepare(self, backbone: nn.Module, wanted: set[str]) -> None:
        if "pooled" not in wanted and getattr(backbone, "pooler", None) is not None:
            backbone.pooler = None  # unused parameters would break DDP and inflate the plan

    def __call__(self, backbone: nn.Module, inputs: tuple[Tensor, ...], wanted: set[str]) -> dict[str, Any]:
        input_ids, attention_mask = inputs
        out = backbone(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state
        taps: dict[str, Any] = {"tokens": (hidden, attention_mask)}
        if "pooled" in wanted:
            pooler = getattr(out, "pooler_output", None)
            taps["pooled"] = pooler if pooler is not None else pool_tokens(hidden, attention_mask, "mean")
        return taps


def pool_tokens(hidden: Tensor, mask: Tensor, how: str) -> Tensor:
    """`cls`: the first token; `mean`: the mean over real (unmasked) tokens; `none`: the sequence."""
    if how == "cls":
        return hidden[:, 0]
    if how == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return hidden


def resolve_hf_source(spec: Backbone) -> str:
    """The folder or hub id a transformers backbone comes from: `weights:` (a folder), a
    `package:<distribution>` name (a model folder shipped inside an installed package), a local
    folder, or a hub id."""
    if spec.weights and Path(spec.weights).is_dir():
        return str(Path(spec.weights))
    if spec.name.startswith(PACKAGE_PREFIX):
        return str(package_model_dir(spec.name[len(PACKAGE_PREFIX) :]))
    if Path(spec.name).expanduser().is_dir():
        return str(Path(spec.name).expanduser().resolve())
    return spec.name


def _is_local(source: str) -> bool:
    return Path(source).is_dir()


@BACKBONE_SOURCES.implements("transformers")
def build_transformers(spec: Backbone, *, load_weights: bool) -> BuiltBackbone:
    check_weights_choice(spec)
    source = resolve_hf_source(spec)
    file_weights = spec.weights if spec.weights and Path(spec.weights).is_file() else None
    pretrained = load_weights and spec.pretrained and file_weights is None
    if pretrained and not _is_local(source) and not is_offline() and not host_reachable(hf_endpoint()):
        raise offline_error(spec, f"{urlparse(hf_endpoint()).hostname} unreachable")
    config, tokenizer = _hf_config_and_tokenizer(spec, source)
    module = _hf_model(spec, source, config, pretrained)
    built = BuiltBackbone(module, TransformersTaps(), hf_input_spec(source, config, tokenizer), tokenizer=tokenizer)
    if load_weights and file_weights:
        load_state_into(
            module,
            read_state_dict(Path(file_weights), spec.sha256),
            strict=spec.strict,
            tolerated=[],
            what=f"weights file {file_weights!r}",
        )
    return built


def _hf_kwargs(spec: Backbone, source: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if spec.revision and not _is_local(source):
        kwargs["revision"] = spec.revision
    if is_offline() or _is_local(source):
        kwargs["local_files_only"] = True
    return kwargs


def _hf_config_and_tokenizer(spec: Backbone, source: str) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoTokenizer

    kwargs = _hf_kwargs(spec, source)
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (*hub_errors(), ValueError) as exc:
        raise _hf_error(spec, source, exc) from None
    for key, value in spec.kwargs.items():  # overrides of the model's config, as from_pretrained applies them
        if not hasattr(config, key):
            raise BuildError(
                f"transformers backbone {spec.name!r} rejected kwargs {spec.kwargs}: its {type(config).__name__} has no {key!r}"
                f"{did_you_mean(key, [k for k in config.to_dict() if not k.startswith('_')])}"
            )
        try:
            setattr(config, key, value)
        except Exception as exc:  # newer configs check types on assignment (huggingface_hub's strict dataclasses)
            raise kwargs_error(spec, exc) from None
    return config, tokenizer


def _hf_model(spec: Backbone, source: str, config: Any, pretrained: bool) -> nn.Module:
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    try:
        if pretrained:
            return AutoModel.from_pretrained(source, config=config, **_hf_kwargs(spec, source))
        return AutoModel.from_config(config, trust_remote_code=False)
    except ZOO_VALUE_ERRORS as exc:
        if spec.kwargs:
            raise kwargs_error(spec, exc) from None
        raise _hf_error(spec, source, exc) from None
    except hub_errors() as exc:
        raise _hf_error(spec, source, exc) from None


def _hf_error(spec: Backbone, source: str, exc: Exception) -> BuildError:
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if _is_local(source):
        return BuildError(f"transformers backbone folder {source!r} cannot be loaded: {first}")
    if is_offline() or "offline" in first.lower() or "connect" in first.lower() or "cache" in first.lower():
        return BuildError(
            f"cannot load transformers backbone {spec.name!r} from the Hugging Face hub (offline and not cached); "
            "point `backbone.name` (or `weights:`) at a local model folder"
        )
    return BuildError(f"transformers backbone {spec.name!r}: {first}")


def hf_input_spec(source: str, config: Any, tokenizer: Any) -> InputSpec:
    limits = [getattr(tokenizer, "model_max_length", 512), getattr(config, "max_position_embeddings", 512)]
    max_length = min(int(x) for x in limits if isinstance(x, int) and x > 0) if limits else 512
    return InputSpec(kind="text", tokenizer=source, max_length=max_length, channels=0, mean=(), std=())
