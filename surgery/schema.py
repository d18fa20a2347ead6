"""The recipe language: typed, documented, closed.

Every model forbids unknown keys; every name that selects behaviour is a key of a registry in
`surgery.registry`; every field has a description, so `surgery schema` documents itself. Defaults
live here and nowhere else. Optional fields default to ``None`` (so a dumped recipe that leaves
them out loads back equal).

This module is the face of the language: each section of a recipe is declared in its own module
under `surgery.sections` (`base`, `layers`, `backbone`, `ops`, `heads`, `placement`, `data`,
`training`, `tuning`, `serving`, `recipe`) and the checks that span sections in
`surgery.sections.checks`; every name is imported from here (`from surgery.schema import Recipe`).
What is defined here is the JSON Schema editors read (`surgery schema`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from surgery.registry import LOSSES
from surgery.sections.backbone import PLUMBING_KWARGS, Backbone, InputOverride
from surgery.sections.base import (
    MAX_COUNT,
    MAX_IMAGE_SIDE,
    MAX_SEED,
    MAX_WIDTH,
    BackboneSource,
    Count,
    DataSourceName,
    ExportFormat,
    LossName,
    MetricName,
    OneOf,
    OptimizerName,
    ParamGlob,
    PositiveInt,
    Probability,
    SchedulerName,
    Seed,
    Strict,
    Width,
    registry_name,
)
from surgery.sections.checks import Problem, cross_check, metric_keys
from surgery.sections.data import (
    Augmentation,
    ColorJitterParams,
    Data,
    FlipParams,
    NoiseParams,
    RandomCropParams,
    ResizedCropParams,
    RotateParams,
    Synthetic,
)
from surgery.sections.heads import Head, LossSpec
from surgery.sections.layers import (
    Conv1x1Params,
    DropoutParams,
    LayerSpec,
    LinearParams,
    MLPParams,
    NoParams,
    NormParams,
)
from surgery.sections.ops import LoraOp, ReplaceOp, SurgeryOp
from surgery.sections.placement import Placement, Stage
from surgery.sections.recipe import Recipe
from surgery.sections.serving import Autoscaling, Export, Serve
from surgery.sections.training import (
    Checkpointing,
    EarlyStopping,
    LrGroup,
    Monitor,
    Optimizer,
    Scheduler,
    Train,
    UnfreezeAt,
    WandB,
)
from surgery.sections.tuning import Domain, TrialResources, Tune

__all__ = [
    "MAX_COUNT",
    "MAX_IMAGE_SIDE",
    "MAX_SEED",
    "MAX_WIDTH",
    "PLUMBING_KWARGS",
    "Augmentation",
    "Autoscaling",
    "Backbone",
    "BackboneSource",
    "Checkpointing",
    "ColorJitterParams",
    "Conv1x1Params",
    "Count",
    "Data",
    "DataSourceName",
    "Domain",
    "DropoutParams",
    "EarlyStopping",
    "Export",
    "ExportFormat",
    "FlipParams",
    "Head",
    "InputOverride",
    "LayerSpec",
    "LinearParams",
    "LoraOp",
    "LossName",
    "LossSpec",
    "LrGroup",
    "MLPParams",
    "MetricName",
    "Monitor",
    "NoParams",
    "NoiseParams",
    "NormParams",
    "OneOf",
    "Optimizer",
    "OptimizerName",
    "ParamGlob",
    "Placement",
    "PositiveInt",
    "Probability",
    "Problem",
    "RandomCropParams",
    "Recipe",
    "ReplaceOp",
    "ResizedCropParams",
    "RotateParams",
    "Scheduler",
    "SchedulerName",
    "Seed",
    "Serve",
    "Stage",
    "Strict",
    "SurgeryOp",
    "Synthetic",
    "Train",
    "TrialResources",
    "Tune",
    "UnfreezeAt",
    "WandB",
    "Width",
    "cross_check",
    "json_schema",
    "metric_keys",
    "registry_name",
]


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
