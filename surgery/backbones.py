"""Backbones: build a zoo model (timm, torchvision, transformers), load its weights, and read its
taps (`logits`, `pooled`, `tokens`, `features`).

The zoo's module is kept as it is (so parameter names are the zoo's own, under `backbone.`); what
is source specific lives in a `Taps` object that knows how to run that module and pick out what the
heads read. Weights come from the zoo's own hub/cache (`pretrained: true`) or a local file/folder
(`weights:`); nothing here ever enables remote code or unpickles arbitrary objects.

This module is the backbones' public face, and the `BACKBONE_SOURCES` registry's owner: importing
it registers every zoo. Its parts, each below the next:

- `surgery.backbone_contract`: `BuiltBackbone`, `Taps`, `build_backbone` and what zoos share;
- `surgery.backbone_hub`: offline mode and hub reachability;
- `surgery.backbone_weights`: local weights files, `package:` model folders, `weights_origin`;
- zoos, one module each, registering with `BACKBONE_SOURCES`: `surgery.backbone_timm`,
  `surgery.backbone_torchvision`, `surgery.backbone_transformers`, `surgery.backbone_tabular`
  (feature vectors); a new zoo is a new module imported below.

`from surgery.backbones import ...` keeps working for every name below; code inside `surgery/`
imports from the part that defines a name.
"""

from __future__ import annotations

from surgery.backbone_contract import BuiltBackbone, Taps, build_backbone, set_submodule
from surgery.backbone_hub import (
    HUB_PROBE_TIMEOUT_S,
    hf_endpoint,
    hf_offline_mode,
    host_reachable,
    is_offline,
    offline_error,
)
from surgery.backbone_tabular import TabularMLP, build_tabular
from surgery.backbone_timm import TimmTaps, build_timm, timm_input_spec
from surgery.backbone_torchvision import TorchvisionTaps, build_torchvision, last_linear_name, torchvision_input_spec
from surgery.backbone_transformers import (
    TransformersTaps,
    build_transformers,
    hf_input_spec,
    pool_tokens,
    resolve_hf_source,
)
from surgery.backbone_weights import (
    PACKAGE_PREFIX,
    load_local_weights,
    load_state_into,
    package_model_dir,
    read_state_dict,
    weights_origin,
)

__all__ = [
    "HUB_PROBE_TIMEOUT_S",
    "PACKAGE_PREFIX",
    "BuiltBackbone",
    "TabularMLP",
    "Taps",
    "TimmTaps",
    "TorchvisionTaps",
    "TransformersTaps",
    "build_backbone",
    "build_tabular",
    "build_timm",
    "build_torchvision",
    "build_transformers",
    "hf_endpoint",
    "hf_input_spec",
    "hf_offline_mode",
    "host_reachable",
    "is_offline",
    "last_linear_name",
    "load_local_weights",
    "load_state_into",
    "offline_error",
    "package_model_dir",
    "pool_tokens",
    "read_state_dict",
    "resolve_hf_source",
    "set_submodule",
    "timm_input_spec",
    "torchvision_input_spec",
    "weights_origin",
]
