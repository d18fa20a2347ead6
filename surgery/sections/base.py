"""What every recipe model shares: `Strict` (unknown keys are errors), `OneOf` (a one-key
mapping), registry-checked names, the ceilings of numbers and the patterns of names.

Some list items are "one-key mappings" — ``{linear: {out_features: 10}}`` — where the key names
the kind (a layer, a surgery op, an augmentation, a search domain). They are modelled as a model
with one optional field per kind and a check that exactly one is set, so errors carry the natural
path (``heads[0].layers[1].linear.out_features``) and editors complete the kinds.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError

from surgery.registry import (
    BACKBONE_SOURCES,
    DATA_SOURCES,
    EXPORT_FORMATS,
    LOSSES,
    METRICS,
    OPTIMIZERS,
    SCHEDULERS,
    Registry,
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

IDENT_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
SLUG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:[0-9]+)?)$"
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
