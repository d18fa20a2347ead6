"""Export formats: each writes one file of the bundle from an `ExportJob` and checks it where it
is written: loaded back (ONNX through onnxruntime) and run on sample inputs of several batch sizes
(or the one batch size a graph takes with `export.dynamic_batch: false`), returning its largest
difference from eager PyTorch. Registered in `EXPORT_FORMATS`; `surgery.export` assembles the bundle.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.bundle import (
    FORMAT_FILES,
    WEIGHTS,
)
from surgery.errors import ExportError
from surgery.registry import EXPORT_FORMATS

VERIFY_BATCH_SIZES = (1, 3)  # besides the batch size a dynamic-batch graph was captured with (2)
CAPTURE_BATCH_SIZE = 2  # torch.export specialises sizes 0 and 1, so capture a dynamic batch with 2
FIXED_BATCH_SIZE = 1  # the batch of `dynamic_batch: false` graphs unless `export.batch_size` says
GRAPH_FORMATS = ("onnx", "torchscript", "pt2")  # formats whose file fixes or frees the batch axis
CAPTURE_SEQUENCE_LENGTH = 16
_ONNX_EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit: larger weights go to model.onnx.data
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class ExportJob:
    """What every format exporter gets: the model, where to write, and the inputs to check with."""

    model: nn.Module
    folder: Path
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    capture: tuple[torch.Tensor, ...]  # inputs the graph is captured with
    samples: list[tuple[torch.Tensor, ...]]  # inputs the written file is checked with
    expected: list[dict[str, torch.Tensor]]  # eager outputs on `samples`
    dynamic_batch: bool
    batch_size: int  # the batch the graph is captured with (the only one it takes when not dynamic)
    dynamic_sequence: bool
    max_sequence: int
    opset: int | None
    details: dict[str, Any] = field(default_factory=dict)  # exporter notes for the manifest

    def dynamic_shapes(self) -> tuple[Any, ...] | None:
        if not self.dynamic_batch and not self.dynamic_sequence:
            return None
        batch = torch.export.Dim("batch", min=1)
        sequence = torch.export.Dim("sequence", min=2, max=max(self.max_sequence, 2))
        dims: dict[int, Any] = {}
        if self.dynamic_batch:
            dims[0] = batch
        if self.dynamic_sequence:
            dims[1] = sequence
        shapes = tuple(dict(dims) for _ in self.input_names)
        # torch.export matches dynamic_shapes to forward's signature: `forward(*inputs)` takes one
        # (variadic) argument holding every input
        params = inspect.signature(self.model.forward).parameters.values()
        return (shapes,) if any(p.kind is p.VAR_POSITIONAL for p in params) else shapes


Runner = Callable[[tuple[torch.Tensor, ...]], dict[str, Any]]


@EXPORT_FORMATS.implements("safetensors")
def export_safetensors(job: ExportJob) -> float:
    """Full state dict (frozen parameters and buffers included); tied tensors stored once."""
    from safetensors.torch import load_file, save_model

    file = job.folder / WEIGHTS
    save_model(job.model, str(file), metadata={"format": "pt"})
    stored = load_file(str(file))
    state = job.model.state_dict()
    diff = 0.0
    for name, tensor in stored.items():
        if name not in state:
            raise ExportError(f"safetensors: wrote a tensor {name!r} the model does not have")
        diff = max(diff, _max_abs_diff(state[name], tensor))
    return diff


@EXPORT_FORMATS.implements("onnx")
def export_onnx(job: ExportJob) -> float:
    """ONNX through torch.export (the `dynamo=True` exporter), checked in onnxruntime."""
    import onnxruntime as ort

    file = job.folder / FORMAT_FILES["onnx"]
    external = _param_bytes(job.model) > _ONNX_EXTERNAL_DATA_BYTES
    with quiet_exporters():
        torch.onnx.export(
            job.model,
            job.capture,
            str(file),
            input_names=list(job.input_names),
            output_names=list(job.output_names),
            opset_version=job.opset,
            dynamic_shapes=job.dynamic_shapes(),
            dynamo=True,
            external_data=external,
        )
    job.details["exporter"] = "torch.onnx.export(dynamo=True)"
    job.details["opset"] = _onnx_opset(file, job.opset)
    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])

    def run(inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
        feed = {name: t.detach().cpu().numpy() for name, t in zip(job.input_names, inputs, strict=True)}
        return dict(zip(job.output_names, session.run(list(job.output_names), feed), strict=True))

    return _verify(job, run)


def _onnx_opset(file: Path, requested: int | None) -> int:
    """The default-domain opset the written file declares: what the manifest says, and what a
    requested `export.opset` must be."""
    import onnx

    model = onnx.load(str(file), load_external_data=False)
    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise ExportError("the written model.onnx declares no ONNX opset")
    if requested is not None and opset != requested:
        raise ExportError(f"export.opset is {requested}, but torch.onnx wrote opset {opset}")
    return opset


@EXPORT_FORMATS.implements("torchscript")
def export_torchscript(job: ExportJob) -> float:
    """TorchScript by tracing (dict outputs need `strict=False`), loaded back from the file."""
    file = job.folder / FORMAT_FILES["torchscript"]
    with quiet_exporters(), torch.no_grad():
        traced = torch.jit.trace(job.model, job.capture, strict=False, check_trace=False)
        torch.jit.save(traced, str(file))
        loaded = torch.jit.load(str(file), map_location="cpu")
    return _verify(job, lambda inputs: loaded(*inputs))


@EXPORT_FORMATS.implements("pt2")
def export_pt2(job: ExportJob) -> float:
    """torch.export ExportedProgram with a dynamic batch dimension, loaded back from the file."""
    file = job.folder / FORMAT_FILES["pt2"]
    with quiet_exporters():
        program = torch.export.export(job.model, job.capture, dynamic_shapes=job.dynamic_shapes())
        torch.export.save(program, str(file))
        loaded = torch.export.load(str(file)).module()
    return _verify(job, lambda inputs: loaded(*inputs))


def _verify(job: ExportJob, run: Runner) -> float:
    """Largest |exported − eager| over every sample input and output."""
    diff = 0.0
    with torch.no_grad():
        for inputs, expected in zip(job.samples, job.expected, strict=True):
            got = run(inputs)
            if not isinstance(got, dict) or set(got) != set(expected):
                keys = sorted(got) if isinstance(got, dict) else type(got).__name__
                raise ExportError(f"outputs {keys} differ from the model's heads {sorted(expected)}")
            for name, want in expected.items():
                diff = max(diff, _max_abs_diff(want, got[name], what=f"output {name!r} at batch {len(inputs[0])}"))
    return diff


def _max_abs_diff(want: torch.Tensor, got: Any, what: str = "tensor") -> float:
    got = torch.as_tensor(got)
    if tuple(got.shape) != tuple(want.shape):
        raise ExportError(f"{what} has shape {list(got.shape)}, eager PyTorch gives {list(want.shape)}")
    if want.numel() == 0:
        return 0.0
    return float((want.detach().double() - got.detach().double()).abs().max())


def export_job(model: nn.Module, recipe: Any, folder: Path) -> ExportJob:
    """The capture and check inputs: a dynamic batch is captured at 2 and checked at 1, 2 and 3;
    a fixed one (`dynamic_batch: false`) is captured and checked at `export.batch_size` alone."""
    spec = model.input_spec
    text = spec.kind == "text"
    dynamic = recipe.export.dynamic_batch
    batch = CAPTURE_BATCH_SIZE if dynamic else recipe.export.batch_size or FIXED_BATCH_SIZE
    others = VERIFY_BATCH_SIZES if dynamic else ()
    if text:
        # short sequences keep export quick; a second length checks the sequence axis is dynamic
        length = min(spec.max_length, CAPTURE_SEQUENCE_LENGTH)
        capture = tuple(model.example_inputs(batch, seq_len=length))
        samples = [capture] + [tuple(model.example_inputs(b, seq_len=length)) for b in others]
        if length >= 4:
            samples.append(tuple(model.example_inputs(others[-1] if others else batch, seq_len=length // 2)))
    else:
        capture = tuple(model.example_inputs(batch))
        samples = [capture] + [tuple(model.example_inputs(b)) for b in others]
    with torch.no_grad():
        expected = [{k: v.detach().clone() for k, v in model(*s).items()} for s in samples]
    return ExportJob(
        model=model,
        folder=folder,
        input_names=tuple(spec.input_names),
        output_names=tuple(expected[0]),
        capture=capture,
        samples=samples,
        expected=expected,
        dynamic_batch=dynamic,
        batch_size=batch,
        dynamic_sequence=text,
        max_sequence=spec.max_length,
        opset=recipe.export.opset,
    )


def error_line(err: BaseException) -> str:
    """One line: the innermost cause (the ONNX exporter wraps torch.export's own error)."""
    while err.__cause__ is not None and not isinstance(err, ExportError):
        err = err.__cause__
    lines = [line.strip() for line in _ANSI.sub("", str(err)).splitlines() if line.strip()]
    text = lines[0] if lines else "(no message)"
    text = text if len(text) <= 300 else text[:297] + "..."
    if "data-dependent" in text:
        text = (
            "the model branches on tensor values (data-dependent control flow), which a graph cannot capture: " + text
        )
    return text if isinstance(err, ExportError) else f"{type(err).__name__}: {text}"


def _param_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@contextlib.contextmanager
def quiet_exporters():
    # The exporters print progress and warn about tracing; a user sees our one line per format.
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.CRITICAL)  # torch.export logs whole graphs when it gives up
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)
