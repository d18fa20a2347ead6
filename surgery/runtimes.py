"""Model runtimes: what runs a bundle's model, behind one interface that serving and batch
prediction share.

A runtime takes a batch of model inputs (the tensors `surgery.preprocess` makes: pixel values,
token ids and mask, feature vectors) and returns each head's outputs as float32 arrays:

- `torch`: the bundle's `SurgicalModel`, eager, under `inference_mode`;
- `onnxruntime`: the bundle's `model.onnx` in an ONNX Runtime session;
- `onnxruntime-int8`: its `model.int8.onnx` (`surgery export --quantize int8`), only when the
  manifest says it passed its parity gate.

Tokenisation and image decoding stay in Python either way; only the network changes. Which
runtime runs is the caller's choice, or measured (`choose_runtime("auto")`): every runtime the
bundle allows runs the same one-example forward, alternately, and the fastest is kept. The ONNX
sessions run on the CPU, or on CUDA through ONNX Runtime's CUDA execution provider where it is
installed (`device="cuda"`).

Nothing here imports torch, onnxruntime or serving code at module level.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from surgery.bundle import INT8_ONNX, ONNX, LoadedBundle
from surgery.errors import BundleError

TORCH = "torch"
ONNXRUNTIME = "onnxruntime"
ONNXRUNTIME_INT8 = "onnxruntime-int8"
RUNTIMES = (TORCH, ONNXRUNTIME, ONNXRUNTIME_INT8)  # most exact first: a tie keeps the more exact one
CHOICES = ("auto", *RUNTIMES)
TIMING_REPEATS = 7  # alternating runs of each runtime; the fastest of each counts
TIMING_BUDGET_S = 1.0  # about what timing may add to a start: fewer repeats for a slow model
TIMING_SEQUENCE = 64  # tokens a text model is timed with (at most its max_length)
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}

K = TypeVar("K")


class Runtime(Protocol):
    """Runs one bundle's model: `run(inputs, threads)` → {head name: float32 array, batch first}."""

    name: str

    def run(self, inputs: Sequence[Any], threads: int | None = None) -> dict[str, np.ndarray]: ...


# --------------------------------------------------------------------------- what a bundle allows


def unavailable(manifest: dict[str, Any], runtime: str) -> str | None:
    """Why `runtime` cannot run the bundle of `manifest` (one clause), or None when it can."""
    if runtime == TORCH:
        return None
    if runtime == ONNXRUNTIME:
        onnx = (manifest.get("formats") or {}).get("onnx")
        if onnx is None:
            return f"the bundle has no {ONNX} (export it with `surgery export RUN --format onnx`)"
        if onnx.get("dynamic_batch") is False:
            return f"its {ONNX} takes a fixed batch size (export.dynamic_batch: false)"
        return None
    if runtime == ONNXRUNTIME_INT8:
        int8 = (manifest.get("quantized") or {}).get("int8")
        if int8 is None:
            return f"the bundle has no {INT8_ONNX} (export it with `surgery export RUN --format onnx --quantize int8`)"
        if not int8.get("passed"):
            return f"its {INT8_ONNX} failed the parity gate ({int8.get('reason') or 'see the manifest'})"
        return unavailable(manifest, ONNXRUNTIME)  # made from model.onnx: its batch axis too
    raise BundleError(f"unknown runtime {runtime!r}; choose one of {', '.join(CHOICES)}")


def check_runtime(bundle: Path | str, manifest: dict[str, Any], requested: str) -> None:
    """Refuse, in one line, a runtime the bundle cannot run (`auto` always can: torch is there)."""
    if requested not in CHOICES:
        raise BundleError(f"unknown runtime {requested!r}; choose one of {', '.join(CHOICES)}")
    if requested != "auto" and (why := unavailable(manifest, requested)) is not None:
        raise BundleError(f"{bundle}: runtime {requested} refused: {why}")


def candidates(manifest: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """The runtimes `auto` chooses among (most exact first), and why each other one is left out."""
    allowed, left_out = [], {}
    for runtime in RUNTIMES:
        why = unavailable(manifest, runtime)
        if why is None:
            allowed.append(runtime)
        else:
            left_out[runtime] = why
    return allowed, left_out


# --------------------------------------------------------------------------- the runtimes


class TorchRuntime:
    """The bundle's `SurgicalModel`, eager. `threads` sets torch's (process-wide) CPU threads."""

    name = TORCH

    def __init__(self, model: Any, heads: Sequence[str], device: str = "cpu") -> None:
        import torch

        self.device = torch.device(device)
        self.model = model.eval() if self.device.type == "cpu" else model.eval().to(self.device)
        self.heads = list(heads)

    def run(self, inputs: Sequence[Any], threads: int | None = None) -> dict[str, np.ndarray]:
        import torch

        if threads and self.device.type == "cpu" and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        with torch.inference_mode():
            outputs = self.model(*(torch.as_tensor(x).to(self.device) for x in inputs))
            return {h: outputs[h].float().cpu().numpy() for h in self.heads}


class OnnxRuntime:
    """An ONNX graph of the bundle in ONNX Runtime. A session's thread pool is fixed when it is
    made, so there is one session per thread count asked for (a replica uses one or two)."""

    def __init__(
        self, name: str, file: Path, input_names: Sequence[str], heads: Sequence[str], device: str = "cpu"
    ) -> None:
        self.name = name
        self.file = Path(file)
        self.input_names = list(input_names)
        self.heads = list(heads)
        self.providers = ort_providers(device)
        self._sessions: dict[int, Any] = {}
        self._types: list[Any] = []

    def session(self, threads: int) -> Any:
        if threads not in self._sessions:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # Replicas share cores with the proxy and each other: threads that spin while waiting
            # slow everyone else down (the same reason serve/ sets OMP_WAIT_POLICY=PASSIVE for torch).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
            options.log_severity_level = 3
            try:
                session = ort.InferenceSession(str(self.file), options, providers=self.providers)
            except Exception as err:  # onnxruntime's own exception types; one line is enough
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise BundleError(f"{self.file}: ONNX Runtime cannot load it: {first}") from None
            self._types = [_ORT_TYPES.get(i.type) for i in session.get_inputs()]
            self._sessions[threads] = session
        return self._sessions[threads]

    def run(self, inputs: Sequence[Any], threads: int | None = None) -> dict[str, np.ndarray]:
        session = self.session(threads or 1)
        feed = {name: _array(x, dtype) for name, x, dtype in zip(self.input_names, inputs, self._types, strict=True)}
        outputs = session.run(self.heads, feed)
        return {h: np.asarray(o, dtype=np.float32) for h, o in zip(self.heads, outputs, strict=True)}


def _array(value: Any, dtype: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(value, dtype=dtype) if dtype is not None else np.ascontiguousarray(value)


def ort_providers(device: str) -> list[Any]:
    """ONNX Runtime execution providers for `device`: `cpu`, or `cuda`/`cuda:N` through the CUDA
    execution provider (onnxruntime-gpu), refused in one line where it is not installed."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda" or device.startswith("cuda:"):
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BundleError(
                f"device {device}: this onnxruntime has no CUDA execution provider (install onnxruntime-gpu)"
            )
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    raise BundleError(f"unknown device {device!r}; use cpu, cuda or cuda:N")


def open_runtime(bundle: LoadedBundle, runtime: str, *, device: str = "cpu") -> Runtime:
    """`runtime` for a loaded bundle; a runtime the bundle cannot run is refused in one line."""
    check_runtime(bundle.path, bundle.manifest, runtime)
    heads = [h["name"] for h in bundle.manifest["heads"]]
    if runtime == TORCH:
        if bundle.model is None:
            raise BundleError(f"{bundle.path}: loaded without its PyTorch model; the torch runtime needs it")
        return TorchRuntime(bundle.model, heads, device)
    if runtime == "auto":
        raise BundleError("`auto` is a choice, not a runtime: call choose_runtime")
    file = bundle.path / (ONNX if runtime == ONNXRUNTIME else INT8_ONNX)
    return OnnxRuntime(runtime, file, bundle.manifest["input_names"], heads, device)


# --------------------------------------------------------------------------- measuring and choosing


def fastest_ms(runs: Mapping[K, Callable[[], float]], repeats: int = TIMING_REPEATS) -> dict[K, float]:
    """The fastest of `repeats` runs of each, in milliseconds; each `run()` does the work once and
    returns its seconds. Runs alternate, and the fastest counts, because other work on the machine
    (another replica starting) only ever adds time: whatever it slows lands on every contender."""
    times: dict[K, list[float]] = {key: [] for key in runs}
    for _ in range(max(1, repeats)):
        for key, run in runs.items():
            times[key].append(run())
    return {key: min(values) * 1000 for key, values in times.items()}


def timed(runtime: Runtime, inputs: Sequence[Any], threads: int | None) -> Callable[[], float]:
    """A `fastest_ms` run: one forward of `inputs` on `runtime`, its seconds."""

    def run() -> float:
        began = time.perf_counter()
        runtime.run(inputs, threads)
        return time.perf_counter() - began

    return run


def example_batch(bundle: LoadedBundle, size: int = 1) -> tuple[Any, ...]:
    """Deterministic inputs of `size` examples, as the bundle's preprocessing would make them."""
    from surgery.model import example_inputs

    spec = bundle.input_spec
    length = min(spec.max_length, TIMING_SEQUENCE) if spec.kind == "text" else None
    return example_inputs(spec, bundle.tokenizer, size, seq_len=length)


@dataclass
class RuntimeChoice:
    """Which runtime runs, and why: what was asked for, and the fastest one-example forward of
    each candidate in ms on the thread count it will run with (empty when nothing was timed)."""

    requested: str
    runtime: str
    reason: str
    timing_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_runtime(
    bundle: LoadedBundle, requested: str = "auto", *, threads: int = 1, device: str = "cpu"
) -> tuple[Runtime, RuntimeChoice]:
    """The runtime to run `bundle` with, warmed up (its first forward, which pays allocations,
    is done). `auto` times every runtime the bundle allows on `threads` threads and keeps the
    fastest; a named one is opened, or refused in one line when the bundle cannot run it."""
    check_runtime(bundle.path, bundle.manifest, requested)
    inputs = example_batch(bundle)
    if requested != "auto":
        runtime = open_runtime(bundle, requested, device=device)
        runtime.run(inputs, threads)
        return runtime, RuntimeChoice(requested, requested, f"{requested} was asked for")
    allowed, left_out = candidates(bundle.manifest)
    if bundle.model is None:  # loaded for an exported graph only
        allowed = [r for r in allowed if r != TORCH]
        left_out[TORCH] = "loaded without the PyTorch model"
    runtimes = {name: open_runtime(bundle, name, device=device) for name in allowed}
    if not runtimes:
        raise BundleError(f"{bundle.path}: no runtime can run it ({'; '.join(left_out.values())})")
    firsts = {name: timed(runtime, inputs, threads)() for name, runtime in runtimes.items()}
    not_timed = "; ".join(f"not {name}: {why}" for name, why in left_out.items())
    if len(runtimes) == 1:
        (name,) = runtimes
        return runtimes[name], RuntimeChoice("auto", name, f"{name}, the only runtime this bundle allows ({not_timed})")
    repeats = max(1, min(TIMING_REPEATS, int(TIMING_BUDGET_S / max(sum(firsts.values()), 1e-9))))
    ms = fastest_ms({name: timed(runtime, inputs, threads) for name, runtime in runtimes.items()}, repeats)
    best = min(ms, key=lambda name: ms[name])  # on a tie, the first: the more exact
    timings = ", ".join(f"{name} {value:.3g} ms" for name, value in ms.items())
    reason = f"fastest one-example forward on {threads} thread(s), best of {repeats}: {timings}"
    if not_timed:
        reason += f" ({not_timed})"
    return runtimes[best], RuntimeChoice("auto", best, reason, {name: round(value, 3) for name, value in ms.items()})
