"""The recipe: every section in one model."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, PrivateAttr

from surgery.sections.backbone import Backbone, InputOverride
from surgery.sections.base import SLUG_PATTERN, ParamGlob, Strict
from surgery.sections.data import Data
from surgery.sections.heads import Head
from surgery.sections.ops import SurgeryOp
from surgery.sections.placement import Placement
from surgery.sections.serving import Export, Serve
from surgery.sections.training import Monitor, Train
from surgery.sections.tuning import Tune


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

    name: Annotated[str, Field(pattern=SLUG_PATTERN)] = Field(
        description="Recipe name; run folders are `runs/<name>/<run-id>`."
    )
    description: str = Field("", description="What this recipe is for.")
    tags: list[Annotated[str, Field(pattern=SLUG_PATTERN)]] | None = Field(
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
