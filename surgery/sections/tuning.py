"""`tune:`: hyperparameter search with Ray Tune, its domains and trial resources."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from surgery.sections.base import OneOf, PositiveInt, Strict


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
