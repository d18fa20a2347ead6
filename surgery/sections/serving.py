"""`export:` (the bundle's formats) and `serve:` (defaults of `surgery serve`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from surgery.registry import EXPORT_FORMATS
from surgery.sections.base import MAX_COUNT, Count, ExportFormat, PositiveInt, Strict

# torch.onnx's (dynamo) exporter writes opset 18 and above; onnx's version converter, which it
# falls back on for older opsets, fails on common graphs (ReduceMean's axes), so older ones are
# refused when the recipe is validated rather than written as 18 under another name.
MIN_ONNX_OPSET = 18


class Export(Strict):
    """Formats written into the bundle at the end of `surgery build` (and by `surgery export`)."""

    formats: list[ExportFormat] = Field(
        default_factory=lambda: ["safetensors"], description="Formats: " + EXPORT_FORMATS.describe()
    )
    opset: Annotated[int, Field(ge=MIN_ONNX_OPSET, le=MAX_COUNT)] | None = Field(
        None,
        description=f"ONNX opset, {MIN_ONNX_OPSET} or above (torch.onnx's exporter writes no older one); default: "
        "the exporter's. The manifest records the opset of the written file; a file of another opset fails.",
    )
    tolerance: float = Field(
        1e-4, gt=0, description="Maximum abs difference between an exported format and eager PyTorch."
    )
    dynamic_batch: bool = Field(
        True,
        description="Exported graphs (onnx, pt2, torchscript) accept any batch size; `false`: they are captured "
        "and checked at `batch_size` alone, which the manifest records (a runtime must feed that batch).",
    )
    batch_size: PositiveInt | None = Field(
        None, description="With `dynamic_batch: false`, the one batch size the graphs take (default 1)."
    )


class Autoscaling(Strict):
    min_replicas: Count = Field(1, description="Fewest replicas.")
    max_replicas: PositiveInt = Field(2, description="Most replicas.")
    target_ongoing_requests: PositiveInt = Field(
        8, description="Requests in flight per replica that autoscaling aims for."
    )


class Serve(Strict):
    """Defaults for `surgery serve` (each can be overridden on the command line)."""

    max_batch_size: PositiveInt = Field(16, description="Largest batch dynamic batching forms.")
    batch_wait_ms: float = Field(2.0, ge=0, description="How long a batch waits to fill after its first request.")
    replicas: Literal["auto"] | PositiveInt = Field(
        "auto",
        description="Replicas of the model (ignored when `autoscaling` is set). `auto`: one per CPU core, at most 4, "
        "each using one core's worth of torch threads (on a CPU this gave more throughput and no worse latency "
        "than one replica using every core).",
    )
    autoscaling: Autoscaling | None = Field(None, description="Ray Serve autoscaling instead of a fixed replica count.")
    max_ongoing_requests: PositiveInt = Field(
        64, description="Requests a replica accepts at once (high enough for batches to fill)."
    )
    max_body_mb: float = Field(4.0, gt=0, description="Largest request body accepted, in MB.")
    request_timeout_s: float = Field(30.0, gt=0, description="Request timeout in seconds.")
    top_k: PositiveInt = Field(5, description="Labels returned per classification head.")
