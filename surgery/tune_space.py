"""The search space of `surgery tune`: the recipe's `tune:` section as plain data that travels to
Ray's workers (`Dimension`, `SearchPlan`), the section's defaults, and the check that refuses a
space before Ray starts.

Every path of the space and every value a domain can produce (each listed value, both ends and
the middle of a range) is loaded into the recipe and validated; a problem is reported at the line
of the space entry that produces it. So is a placement a trial cannot carry out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from surgery.errors import RecipeError, SurgeryError
from surgery.schema import Domain, Recipe, Tune


class TuneError(SurgeryError):
    """A search that cannot start or resume as asked."""


class SpaceError(TuneError, RecipeError):
    """A search refused before Ray starts: every problem of its recipe and space, one line each."""


def _value_text(value: Any) -> str:
    """A value as `--set` reads it (YAML, one line)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip().removesuffix("\n...").strip()


def set_override(path: str, value: Any) -> str:
    return f"{path}={_value_text(value)}"


@dataclass(frozen=True)
class Dimension:
    """One searched recipe path and its domain, as plain data (it travels to Ray workers)."""

    path: str
    kind: str
    params: tuple[Any, ...]

    @classmethod
    def of(cls, path: str, domain: Domain) -> Dimension:
        return cls(path, domain.kind, tuple(domain.params))

    def quantize(self, x: float) -> float:
        low, high, q = self.params
        steps = math.floor((min(max(x, low), high) - low) / q + 0.5)
        steps = min(steps, math.floor((high - low) / q + 1e-9))
        return round(low + steps * q, 12)

    def corner_values(self) -> list[Any]:
        """Every value this domain can produce that validation must see: all listed values, both
        ends of a range and a value inside it (an integer field rejects 2.5, not 2.0 or 3.0)."""
        if self.kind in ("grid", "choice"):
            return list(self.params)
        low, high = self.params[0], self.params[1]
        if self.kind == "randint":
            return list(dict.fromkeys([low, high - 1]))
        if self.kind == "loguniform":
            return [low, math.sqrt(low * high), high]
        if self.kind == "quniform":
            return list(dict.fromkeys([self.quantize(low), self.quantize((low + high) / 2), self.quantize(high)]))
        return [low, (low + high) / 2, high]

    def ray_domain(self) -> Any:
        """The Ray Tune domain. Listed values are searched by index (so any YAML value works with
        every searcher); quniform is sampled uniformly and stepped here (TuneBOHB drops Ray's
        quantization)."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(range(len(self.params))))
        if self.kind == "choice":
            return tune.choice(list(range(len(self.params))))
        if self.kind == "loguniform":
            return tune.loguniform(*self.params)
        if self.kind == "randint":
            return tune.randint(*self.params)
        return tune.uniform(self.params[0], self.params[1])

    def decode(self, raw: Any) -> Any:
        raw = raw.item() if hasattr(raw, "item") else raw  # numpy scalars from the searchers
        if self.kind in ("grid", "choice"):
            return self.params[int(raw)]
        if self.kind == "randint":
            return int(raw)
        if self.kind == "quniform":
            return self.quantize(float(raw))
        return float(raw)


@dataclass(frozen=True)
class SearchPlan:
    """Everything a trial needs to load its recipe and find its folder (sent to every trial)."""

    recipe_path: str
    overrides: tuple[str, ...]
    cwd: str
    folder: str
    dimensions: tuple[Dimension, ...]
    metric: str
    mode: str

    def values(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return {d.path: d.decode(config[d.path]) for d in self.dimensions}

    def trial_overrides(self, values: Mapping[str, Any]) -> list[str]:
        return [*self.overrides, *(set_override(p, v) for p, v in values.items())]


def metric_mode(tune: Tune) -> str:
    """`tune.mode`, or its default: minimise a loss, maximise any other metric."""
    if tune.mode is not None:
        return tune.mode
    return "min" if tune.metric.endswith("loss") else "max"


def trial_refusal(recipe: Recipe) -> str | None:
    """Why a trial of `recipe` cannot run: a placement this build cannot carry out in a trial
    (never quietly trained on one device instead)."""
    from surgery.placement import placement_for

    placement = recipe.placement
    if placement.strategy == "single":
        return None
    if placement.strategy == "ddp":
        if _ray_train_launcher() is None:
            return (
                "placement.strategy 'ddp': multi-worker trials need surgery's Ray Train launcher, which this "
                "build lacks; search with `placement.strategy: single`, then build the tuned recipe with ddp"
            )
        return None
    try:
        placement_for(recipe).close()
    except SurgeryError as err:
        return str(err)
    return None


def _ray_train_launcher() -> Any:
    """`surgery.ray_train.train_on_ray` (`fit` on Ray Train's TorchTrainer), where this build has it."""
    try:
        from surgery.ray_train import train_on_ray
    except ImportError:
        return None
    return train_on_ray


def trial_resources(recipe: Recipe) -> tuple[float, float]:
    """(CPUs, GPUs) one trial holds. A ddp trial's Tune function holds nothing itself: its Ray
    Train workers take one CPU each (and one GPU each on CUDA)."""
    assert recipe.tune is not None
    placement = recipe.placement
    if placement.strategy == "ddp":
        return float(placement.workers), float(placement.workers if placement.device.startswith("cuda") else 0)
    return recipe.tune.resources.cpus, recipe.tune.resources.gpus


def scheduler_name(tune: Tune) -> str:
    """`tune.scheduler`, or its default: BOHB's own HyperBand for `search: bohb`, none otherwise."""
    return tune.scheduler or ("hyperband" if tune.search == "bohb" else "none")


def num_samples(tune: Tune) -> int:
    """`tune.num_samples`, or its default: the grid once, 8 samples otherwise."""
    return tune.num_samples or (1 if tune.search == "grid" else 8)


def check_space(recipe_path: str | Path, overrides: Sequence[str], recipe: Recipe) -> None:
    """Load the recipe with every value each domain can produce, and refuse the search (before Ray
    starts) with every problem found, each at the line of the space entry that produced it."""
    assert recipe.tune is not None
    dimensions = [Dimension.of(path, domain) for path, domain in recipe.tune.space.items()]
    problems = _fits_problems(recipe) + space_problems(recipe_path, overrides, dimensions)
    if problems:
        raise SpaceError(list(dict.fromkeys(problems)))


def load_search(recipe_path: str | Path, overrides: Sequence[str]) -> Recipe:
    """The recipe to search, checked as a whole before Ray starts: every problem at once, each at
    its line — what the schema refuses (in the space and elsewhere), what each value a domain can
    produce does to the recipe, and what this machine cannot run. When the schema refuses only
    parts of `tune:`, the space's other entries are still checked, so one run of `surgery tune`
    lists everything to fix."""
    from surgery.recipe import load_recipe

    try:
        recipe = load_recipe(recipe_path, overrides)
    except RecipeError as err:
        raise SpaceError(err.problems + _rest_of_space(recipe_path, overrides)) from None
    if recipe.tune is None:
        raise TuneError(f"{recipe_path}: the recipe has no `tune:` section; `surgery tune` needs a search space")
    if recipe.data is None:
        raise TuneError(f"{recipe_path}: the recipe has no `data:` section; trials need training data")
    dimensions = [Dimension.of(path, domain) for path, domain in recipe.tune.space.items()]
    problems = runnable_problems(recipe_path, overrides, recipe)
    problems += _fits_problems(recipe) + space_problems(recipe_path, overrides, dimensions)
    if problems:
        raise SpaceError(list(dict.fromkeys(problems)))
    return recipe


def _rest_of_space(recipe_path: str | Path, overrides: Sequence[str]) -> list[str]:
    """Problems of the space's well-formed entries, in a recipe the schema refused: checked
    against the recipe without its `tune:` section, when that much of it is valid."""
    from pydantic import ValidationError

    from surgery.recipe import load_recipe, unvalidated_data

    untuned = [*overrides, "tune=null"]
    try:
        load_recipe(recipe_path, untuned)
        tune = unvalidated_data(recipe_path, overrides).get("tune")
    except SurgeryError:  # problems outside `tune:`, reported by the schema already
        return []
    space = tune.get("space") if isinstance(tune, dict) else None
    dimensions = []
    for path, raw in space.items() if isinstance(space, dict) else ():
        try:
            dimensions.append(Dimension.of(str(path), Domain.model_validate(raw)))
        except ValidationError:
            continue  # the schema said why
    return space_problems(recipe_path, overrides, dimensions, base=untuned)


def _fits_problems(recipe: Recipe) -> list[str]:
    from surgery.model import check_fits_in_memory

    try:
        check_fits_in_memory(recipe)
    except SurgeryError as err:
        return [str(err)]
    return []


def runnable_problems(recipe_path: str | Path, overrides: Sequence[str], recipe: Recipe) -> list[str]:
    """What this machine or package set cannot carry out, each at the line of the field to change."""
    import importlib.util

    from surgery.recipe import field_location

    assert recipe.tune is not None

    def at(*field: str) -> str:
        return f"{field_location(recipe_path, overrides, field)} {'.'.join(field)}"

    problems = []
    if reason := trial_refusal(recipe):
        problems.append(f"{at('placement', 'strategy')}: {reason}")
    if recipe.placement.strategy == "ddp" and "resources" in recipe.tune.model_fields_set:
        problems.append(
            f"{at('tune', 'resources')}: a ddp trial holds its Ray Train workers (one CPU each, one GPU each on "
            "CUDA); set placement.workers instead"
        )
    needs = {"bohb": ("hpbandster", "ConfigSpace"), "optuna": ("optuna",)}.get(recipe.tune.search, ())
    if missing := [m for m in needs if importlib.util.find_spec(m) is None]:
        problems.append(
            f"{at('tune', 'search')}: {recipe.tune.search!r} needs {', '.join(missing)}: pip install 'surgery[tune]'"
        )
    if recipe.placement.device.startswith("cuda") and not trial_resources(recipe)[1]:
        problems.append(
            f"{at('placement', 'device')}: asks for CUDA but tune.resources.gpus is 0: give each trial a GPU share"
        )
    return problems


def space_problems(
    recipe_path: str | Path, overrides: Sequence[str], dimensions: Sequence[Dimension], *, base: Sequence[str] = ()
) -> list[str]:
    """Every value each dimension can produce, set into the recipe (`overrides`, then `base`) and
    validated as `--set` would: each problem at the line of its space entry."""
    from surgery.model import check_fits_in_memory
    from surgery.recipe import field_location, load_recipe

    base = list(base) or list(overrides)
    problems: list[str] = []
    for dimension in dimensions:
        path = dimension.path
        where = field_location(recipe_path, overrides, ("tune", "space", path))
        label = f"{where} tune.space[{path!r}]"
        if path.split(".")[0].split("[")[0] == "placement":
            problems.append(f"{label}: the placement is fixed for a search (it sets what each trial holds)")
            continue
        for value in dimension.corner_values():
            override = set_override(path, value)
            said = f"{label}: {dimension.kind} value {_value_text(value)}"
            try:
                trial = load_recipe(recipe_path, [*base, override])
            except RecipeError as err:
                for line in err.problems:
                    problems.append(f"{said}: {line.removeprefix(f'--set {override}').lstrip(' :')}")
                continue
            except SurgeryError as err:
                problems.append(f"{said}: {err}")
                continue
            if reason := trial_refusal(trial):
                problems.append(f"{said}: {reason}")
                continue
            try:
                check_fits_in_memory(trial)  # a value that makes the model bigger than this machine
            except SurgeryError as err:
                problems.append(f"{said}: {err}")
    return problems
