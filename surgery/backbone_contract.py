"""The backbone contract: what a zoo builder returns (`BuiltBackbone`, `Taps`), the one entry point
(`build_backbone`, dispatching on the `BACKBONE_SOURCES` registry), and what the zoos share.

The zoo's module is kept as it is (so parameter names are the zoo's own, under `backbone.`); what
is source specific lives in a `Taps` object that knows how to run that module and pick out what the
heads read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from surgery.errors import BuildError
from surgery.inputs import InputSpec
from surgery.registry import BACKBONE_SOURCES
from surgery.schema import Backbone


@dataclass
class BuiltBackbone:
    """A zoo module plus what the model needs to know about it."""

    module: nn.Module
    taps: Taps
    input_spec: InputSpec
    tokenizer: Any = None
    classifier: list[str] = field(default_factory=list)  # state-dict keys tolerated as mismatched
    # Builds the zoo's module again, without weights: its parameters carry the model's own
    # initialisation (what `reinit` restores). None where the zoo has no such constructor.
    fresh: Callable[[], nn.Module] | None = None


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


def kwargs_error(spec: Backbone, exc: BaseException) -> BuildError:
    """A zoo constructor's failure as one line, naming the recipe's kwargs when it has any."""
    first = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
    if not spec.kwargs:
        return BuildError(f"{spec.source} cannot build backbone {spec.name!r}: {first}")
    return BuildError(f"{spec.source} backbone {spec.name!r} rejected kwargs {spec.kwargs}: {first}")


# What a zoo's constructor raises for a value it cannot use (a string where it wants a number, a
# pool type it doesn't know, a depth list that divides by zero): one line naming the kwargs.
ZOO_VALUE_ERRORS = (
    TypeError,
    ValueError,
    AssertionError,
    AttributeError,
    IndexError,
    KeyError,
    ArithmeticError,
    NotImplementedError,
)


def classifier_keys(module: nn.Module, classifier: nn.Module | None) -> list[str]:
    """The state-dict keys of `classifier` inside `module` (weights may not fit them: other classes)."""
    if classifier is None:
        return []
    ids = {id(p) for p in classifier.parameters()} | {id(b) for b in classifier.buffers()}
    return [k for k, v in module.state_dict(keep_vars=True).items() if id(v) in ids]


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at the dotted `name` inside `root`."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
