"""`export:` (the bundle's formats) and `serve:` (defaults of `surgery serve`)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

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
    quantize: Literal["int8"] | None = Field(
        None,
        description="Also write `model.int8.onnx`, quantized from `model.onnx` (needs `onnx` in `formats`): static "
        "QDQ calibrated on a seeded sample of the training data for image and vector models, dynamic for text "
        "models. The manifest records, per head, the monitored metric on the validation split for the float and "
        "the int8 model and their agreement; the parity gate (`quantize_max_drop`) decides whether serving may use it.",
    )
    # Unset (None) means the default below: a recipe that leaves them out dumps, and so hashes, as
    # it did before they existed, and bundles exported earlier still match their recipe_sha256.
    QUANTIZE_MAX_DROP: ClassVar[float] = 0.01
    CALIBRATION_SAMPLES: ClassVar[int] = 128
    quantize_max_drop: float | None = Field(
        None,
        description="Parity gate: the largest drop of any head's monitored metric from the float to the int8 "
        "ONNX model on the validation split, in the metric's own units (unset: 0.01, one point of accuracy; for "
        "`mse` and `mae` a rise). A bigger drop marks the int8 model failed in the manifest and serving never "
        "uses it (a negative value demands that int8 be better).",
    )
    calibration_samples: PositiveInt | None = Field(
        None,
        description="Training samples (drawn with `train.seed`) that static int8 quantization calibrates on "
        "(unset: 128).",
    )

    @model_validator(mode="after")
    def _quantize_needs_onnx(self) -> Export:
        if self.quantize is not None and "onnx" not in self.formats:
            raise PydanticCustomError(
                "quantize_needs_onnx", "{msg}", {"msg": "quantize: int8 is made from model.onnx: add onnx to formats"}
            )
        return self


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
    runtime: Literal["auto", "torch", "onnxruntime", "onnxruntime-int8"] | None = Field(
        None,
        description="What runs the model in each replica: `torch` (eager, `inference_mode`), `onnxruntime` "
        "(the bundle's `model.onnx`), `onnxruntime-int8` (its `model.int8.onnx`, refused unless it passed the "
        "parity gate), or `auto` (also when unset): each replica times every runtime the bundle allows on its "
        "thread share when it starts and keeps the fastest (`stats` and `GET /v1/models/{name}` say which and why).",
    )
