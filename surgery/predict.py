"""Offline `surgery predict BUNDLE INPUTS...`: batch prediction with the bundle's own
preprocessing, no server. Inputs are decoded by a DataLoader (workers when the machine has cores
to spare), each batch runs through a `ModelRunner`, and rows stream to the output file.

A row that cannot be used (a missing or broken image, an empty text, a cell that is not a number)
gets its reason in the `error` column; every other row is predicted. The same job runs on Ray Data
past one machine (`surgery.predict_ray`), writing the same rows.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from surgery.cluster import ray_address
from surgery.errors import SurgeryError
from surgery.predict_batch import PredictSettings, progress_bar, row_transform, run_batch
from surgery.predict_inputs import PredictInput, expand_inputs, read_input
from surgery.predict_output import PredictionWriter, columns, output_format
from surgery.runner import ModelRunner


def predict_command(
    bundle: Path,
    inputs: list[str],
    *,
    out: Path | None,
    settings: PredictSettings,
    engine: str | None = None,
    concurrency: int = 2,
) -> str:
    """`surgery predict BUNDLE INPUTS...`: predict every input, write `out` (or print a table).
    `engine`: `local`, `ray`, or None for `ray` when RAY_ADDRESS is set. Returns the summary line."""
    from surgery.bundle import resolve_bundle

    if settings.top_k < 1 or settings.batch_size < 1:
        raise SurgeryError("--top-k and --batch-size must be at least 1")
    output_format(out)  # a wrong suffix is refused before the model loads
    engine = engine or ("ray" if ray_address() else "local")
    if engine not in ("local", "ray"):
        raise SurgeryError(f"--engine {engine}: choose local or ray")
    path = resolve_bundle(Path(bundle))
    if engine == "ray":
        from surgery.predict_ray import predict_on_ray

        count, errors, seconds = predict_on_ray(path, inputs, out, settings, concurrency)
    else:
        count, errors, seconds = predict_local(path, inputs, out, settings)
    where = f" -> {out}" if out is not None else ""
    failed = f", {errors} unreadable (see the error column)" if errors else ""
    return f"predicted {count} inputs in {seconds:.1f}s on {engine}{failed}{where}"


def predict_local(
    bundle: Path, inputs: list[str], out: Path | None, settings: PredictSettings
) -> tuple[int, int, float]:
    """Predict in this process; (rows, rows with an error, seconds)."""
    from surgery.runner import open_runner

    started = time.perf_counter()
    runner = open_runner(bundle, settings.runtime)
    entries = expand_inputs(inputs, runner.spec, column=settings.column, recipe=runner.recipe)
    writer = PredictionWriter(out, columns(runner.heads, settings.top_k))
    try:
        with progress_bar(len(entries)) as advance:
            for rows in predicted_batches(runner, entries, settings):
                writer.write(rows)
                advance(len(rows))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return writer.count, writer.errors, time.perf_counter() - started


class Decoded:
    """A map-style dataset of inputs -> (index, model row or None, error or None); never raises,
    so a DataLoader worker survives any file."""

    def __init__(self, entries: list[PredictInput], spec: Any) -> None:
        self.entries = entries
        self.spec = spec
        self.transform = row_transform(spec)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[int, Any, str | None]:
        try:
            return index, read_input(self.entries[index], self.spec, self.transform), None
        except Exception as err:  # one bad input is one row's error, never the job's
            return index, None, str(err) or type(err).__name__


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


def predicted_batches(
    runner: ModelRunner, entries: list[PredictInput], settings: PredictSettings
) -> Iterator[list[dict[str, Any]]]:
    """The output rows of each batch, in input order."""
    import torch
    from torch.utils.data import DataLoader

    from surgery.data_loaders import auto_num_workers

    workers = settings.workers if settings.workers is not None else auto_num_workers("auto", torch.device("cpu"))
    loader = DataLoader(
        Decoded(entries, runner.spec),
        batch_size=settings.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_as_list,
    )
    for batch in loader:
        yield run_batch(runner, [entries[i].name for i, _, _ in batch], [(row, err) for _, row, err in batch], settings)
