"""One batch of predictions, the part every engine shares: settings, decoded rows through a
`ModelRunner` into output rows, and the progress bar. The local engine (`surgery.predict`) and the
Ray Data actors (`surgery.predict_ray`) both call these, so they give the same rows."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from surgery.inputs import InputSpec
from surgery.predict_output import error_row, prediction_rows
from surgery.runner import ModelRunner


@dataclass(frozen=True)
class PredictSettings:
    """How a batch prediction runs; the same for every engine."""

    top_k: int = 5
    batch_size: int = 64
    workers: int | None = None  # DataLoader workers (None: surgery.data_loaders.auto_num_workers)
    column: str | None = None  # a table's input column(s)
    runtime: str | None = None  # surgery.runtimes' choice (None: the bundled recipe's serve.runtime, else auto)


def run_batch(
    runner: ModelRunner, names: list[str], decoded: list[tuple[Any, str | None]], settings: PredictSettings
) -> list[dict[str, Any]]:
    """Rows for one batch of decoded inputs ((row, None) or (None, error)), in order."""
    good = [i for i, (_, err) in enumerate(decoded) if err is None]
    rows: list[dict[str, Any]] = [error_row(name, err or "") for name, (_, err) in zip(names, decoded, strict=True)]
    if good:
        outputs = runner.run(model_inputs(runner, [decoded[i][0] for i in good]))
        for i, row in zip(
            good, prediction_rows(runner.heads, outputs, [names[i] for i in good], settings.top_k), strict=True
        ):
            rows[i] = row
    return rows


def row_transform(spec: InputSpec) -> Callable[[Any], Any] | None:
    """What one decoded image becomes before it is batched: uint8 pixels, converted, resized and
    cropped as the bundle says. Scaling and normalising wait for the batch (`model_inputs`): the
    same elementwise arithmetic as `image_eval_transform`, so the same numbers, in a few tensor
    operations per batch instead of per image, and a quarter of the bytes to stack. None for
    inputs that are not images."""
    if spec.kind != "image":
        return None
    from surgery.preprocess import image_mode, image_to_uint8

    image_mode(spec)  # an unsupported channel count fails here, before any row

    def transform(image: Any) -> Any:
        return image_to_uint8(image, spec)

    return transform


def model_inputs(runner: ModelRunner, rows: list[Any]) -> tuple[Any, ...]:
    """A batch of model rows as the model's positional inputs (text tokenised, images' uint8
    pixels scaled and normalised here)."""
    import torch

    if runner.spec.kind == "text":
        from surgery.preprocess import texts_to_batch

        return texts_to_batch(rows, runner.tokenizer, runner.spec)
    if runner.spec.kind == "image":
        from surgery.preprocess import normalise

        return (normalise(torch.stack(rows), runner.spec),)
    return (torch.stack(rows),)


@contextlib.contextmanager
def progress_bar(total: int) -> Iterator[Callable[[int], None]]:
    """`advance(n)`: a rich progress bar on stderr when it is a terminal; silent otherwise."""
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    bar = Progress(
        "predict", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=Console(file=sys.stderr)
    )
    task = bar.add_task("predict", total=total)
    with bar:
        yield lambda n: bar.advance(task, n)
