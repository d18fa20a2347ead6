"""What a served model runs with: the arguments of `build_app`, the recipe's `serve:` section, and
the Ray Serve deployment options they make. Plain data; no Ray, no torch."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from serve.tokens import TOKEN_ENV
from surgery.bundle import RECIPE, WEIGHTS
from surgery.errors import BundleError
from surgery.schema import Serve as ServeSection

INGRESS_NAME = "SurgeryAPI"
BATCH_KEYS = ("max_batch_size", "batch_wait_timeout_s")
# A replica whose constructor fails (its bundle unreadable on that node) fails the same way when
# retried: give up after a few tries instead of Ray's 20, so the deploy fails in seconds.
CONSTRUCTOR_RETRIES = 3
# What a recipe's `serve:` section may ask for. A recipe is data from anyone: its numbers are
# capped (one line says so), never passed to Ray as they stand. Overrides given on the command
# line or in a Serve config's `args` are the operator's own and are not capped.
MAX_BODY_MB = 256.0  # a body is held in memory whole, once per request in flight
MAX_REQUEST_TIMEOUT_S = 600.0
MAX_BATCH_WAIT_MS = 1000.0
MAX_BATCH_SIZE = 1024
MAX_ONGOING_REQUESTS = 4096  # HAProxy's `maxconn`: more could never arrive at once
REPLICA_BASE_BYTES = 512 * 2**20  # a replica's Python, torch and Ray worker before the model
# Ray answers a request itself (408, text) once its `request_timeout_s` passes; it is given this
# much more than the app's own, so the app's JSON 504 always comes first.
RAY_TIMEOUT_MARGIN_S = 10.0
BATCH_DEFAULTS = {
    "max_batch_size": ServeSection().max_batch_size,
    "batch_wait_timeout_s": ServeSection().batch_wait_ms / 1000,
}


class AppArgs(BaseModel):
    """Arguments of `build_app` (the `args:` of a Serve config file)."""

    model_config = ConfigDict(extra="forbid")

    bundles: list[str] = Field(min_length=1, description="Bundle folders to serve (one model each).")
    max_batch_size: int | None = Field(None, ge=1, description="Overrides the recipes' serve.max_batch_size.")
    batch_wait_ms: float | None = Field(None, ge=0, description="Overrides the recipes' serve.batch_wait_ms.")
    replicas: int | None = Field(None, ge=1, description="Overrides the recipes' serve.replicas.")
    max_body_mb: float | None = Field(None, gt=0, description="Overrides the recipes' serve.max_body_mb.")
    request_timeout_s: float | None = Field(None, gt=0, description="Overrides the recipes' serve.request_timeout_s.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for each model replica.")
    threads: int | None = Field(
        None, ge=1, description="torch threads per model replica (default: num_cpus, at least 1)."
    )
    solo_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads for a request the replica has to itself, with no other replica on the node "
        "busy (default: threads). `surgery serve` on one machine sets it to the core count, so a lone request "
        "uses every core while load is still spread one replica per core.",
    )
    time_solo_threads: bool = Field(
        True,
        description="When solo_threads > threads, time a forward of one example on each when the replica starts and "
        "give a lone request only `threads` where a forward on solo_threads is at least 10% slower: a small model's "
        "forward is slower on more threads (waking and joining them costs more than its work).",
    )
    runtime: Literal["auto", "torch", "onnxruntime", "onnxruntime-int8"] | None = Field(
        None, description="Overrides the recipes' serve.runtime (what runs the model in each replica)."
    )
    token_file: str | None = Field(
        None, description=f"File holding the bearer token (else ${TOKEN_ENV} in the replica)."
    )
    token_sha256: str | None = Field(None, description="sha256 hex of the bearer token (what `surgery serve` passes).")


@dataclass(frozen=True)
class Machine:
    """What replicas started from here share: CPUs and memory (None: not known, not capped)."""

    cpus: int | None
    memory_bytes: int | None

    @classmethod
    def here(cls) -> Machine:
        """This machine, where `surgery serve` starts its own Ray; on a cluster (`RAY_ADDRESS`)
        the cluster places replicas and only the fixed maxima apply."""
        if os.environ.get("RAY_ADDRESS"):
            return cls(None, None)
        import psutil

        return cls(os.cpu_count() or 1, int(psutil.virtual_memory().available))


def replica_limit(machine: Machine, weights_bytes: int) -> tuple[int, str] | None:
    """The most replicas of one model the machine holds (one per CPU; each needs its weights, a
    second copy's worth for activations, and REPLICA_BASE_BYTES), and why; None when unknown."""
    limits = []
    if machine.cpus is not None:
        limits.append((machine.cpus, f"{machine.cpus} CPUs here"))
    if machine.memory_bytes is not None:
        each = REPLICA_BASE_BYTES + 2 * weights_bytes
        limits.append(
            (
                max(1, machine.memory_bytes // each),
                f"{machine.memory_bytes / 2**30:.1f} GiB free, ~{each / 2**30:.1f} GiB each",
            )
        )
    return min(limits) if limits else None


def capped_section(section: ServeSection, machine: Machine, weights_bytes: int) -> tuple[ServeSection, list[str]]:
    """The section with every number past what this machine (or any) should take capped, and one
    line per capped setting."""
    notes: list[str] = []

    def cap(field: str, value: float, limit: float, why: str) -> float:
        if value <= limit:
            return value
        notes.append(f"serve.{field} {value:g} capped to {limit:g} ({why})")
        return limit

    updates: dict[str, Any] = {
        "max_body_mb": cap("max_body_mb", section.max_body_mb, MAX_BODY_MB, "the most this server accepts"),
        "request_timeout_s": cap(
            "request_timeout_s", section.request_timeout_s, MAX_REQUEST_TIMEOUT_S, "the most this server waits"
        ),
        "batch_wait_ms": cap("batch_wait_ms", section.batch_wait_ms, MAX_BATCH_WAIT_MS, "the most a batch waits"),
        "max_batch_size": int(cap("max_batch_size", section.max_batch_size, MAX_BATCH_SIZE, "the largest batch")),
        "max_ongoing_requests": int(
            cap("max_ongoing_requests", section.max_ongoing_requests, MAX_ONGOING_REQUESTS, "HAProxy's maxconn")
        ),
    }
    limit = replica_limit(machine, weights_bytes)
    if limit is not None:
        most, why = limit
        if isinstance(section.replicas, int):
            updates["replicas"] = int(cap("replicas", section.replicas, most, why))
        if section.autoscaling is not None:
            auto = section.autoscaling
            top = int(cap("autoscaling.max_replicas", auto.max_replicas, most, why))
            low = int(cap("autoscaling.min_replicas", auto.min_replicas, top, "its max_replicas"))
            updates["autoscaling"] = auto.model_copy(update={"max_replicas": top, "min_replicas": low})
    return section.model_copy(update=updates), notes


_ANNOUNCED: set[str] = set()


def _announce(where: Path, note: str) -> None:
    """One line on stderr per bundle and setting, once per process (the launcher and
    `build_app` read the same section)."""
    key = f"{where} {note.split(' ', 1)[0]}"
    if key not in _ANNOUNCED:
        _ANNOUNCED.add(key)
        print(f"warning: {where}: {note}", file=sys.stderr, flush=True)


def serve_section(bundle: str | Path, machine: Machine | None = None) -> ServeSection:
    """The bundle recipe's `serve:` section as it will run: capped for this machine, one line per
    capped setting."""
    weights = Path(bundle) / WEIGHTS
    section, notes = capped_section(
        read_serve_section(bundle), machine or Machine.here(), weights.stat().st_size if weights.is_file() else 0
    )
    for note in notes:
        _announce(Path(bundle) / RECIPE, note)
    return section


def read_serve_section(bundle: str | Path) -> ServeSection:
    """The `serve:` section of the bundle's resolved recipe (schema defaults when absent), as written."""
    path = Path(bundle) / "recipe.yaml"
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        data = {}
    section = data.get("serve") if isinstance(data, dict) else None
    try:
        return ServeSection.model_validate(section or {})
    except ValueError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in getattr(exc, "errors", list)()[:3]
        )
        raise BundleError(f"{path}: invalid serve section ({problems or 'not a mapping'})") from None


def model_settings(args: AppArgs, section: ServeSection) -> dict[str, Any]:
    """Per-model settings: command-line/config overrides win over the recipe's serve section."""
    threads = args.threads or max(1, int(args.num_cpus))
    return {
        "max_batch_size": args.max_batch_size or section.max_batch_size,
        "batch_wait_timeout_s": (args.batch_wait_ms if args.batch_wait_ms is not None else section.batch_wait_ms)
        / 1000,
        "max_body_mb": args.max_body_mb or section.max_body_mb,
        "request_timeout_s": args.request_timeout_s or section.request_timeout_s,
        "top_k": section.top_k,
        "threads": threads,
        "solo_threads": max(threads, args.solo_threads or threads),
        "time_solo_threads": args.time_solo_threads,
        "runtime": args.runtime or section.runtime or "auto",
    }


def check_runtimes(args: AppArgs) -> None:
    """Refuse, in one line and before anything is deployed, a runtime a bundle cannot run (no
    model.onnx for `onnxruntime`, an int8 model that failed its parity gate...)."""
    from surgery.bundle import read_manifest
    from surgery.runtimes import check_runtime

    for bundle in args.bundles:
        check_runtime(bundle, read_manifest(bundle), model_settings(args, read_serve_section(bundle))["runtime"])


def replica_count(setting: str | int) -> int:
    """`serve.replicas` as a number: `auto` is one replica per CPU core, at most 4."""
    return min(4, os.cpu_count() or 1) if setting == "auto" else int(setting)


def deployment_options(args: AppArgs, section: ServeSection, settings: dict[str, Any]) -> dict[str, Any]:
    """Ray Serve deployment options for one model (replicas, autoscaling, batch user_config)."""
    options: dict[str, Any] = {
        "max_ongoing_requests": max(section.max_ongoing_requests, 2 * settings["max_batch_size"]),
        "user_config": {
            "max_batch_size": settings["max_batch_size"],
            "batch_wait_timeout_s": settings["batch_wait_timeout_s"],
        },
        "ray_actor_options": {"num_cpus": args.num_cpus},
    }
    if args.replicas is None and section.autoscaling is not None:
        auto = section.autoscaling
        options["autoscaling_config"] = {
            "min_replicas": auto.min_replicas,
            "max_replicas": auto.max_replicas,
            "target_ongoing_requests": auto.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = args.replicas or replica_count(section.replicas)
    return options


def model_deployment_name(name: str) -> str:
    return f"model-{name}"
