"""Batch prediction past one machine: the same job as `surgery.predict`, on Ray Data.

The inputs are expanded on the driver (as locally) into a dataset (`ray.data.from_items`),
`map_batches` runs them through a pool of actors, each of which loads the bundle once and decodes
and predicts whole batches with the same functions as the local engine, and the driver streams
the rows, in input order, to the same writer. Paths are made absolute so every node reads the
same files (a cluster needs them on shared storage). Ray is started through `surgery.cluster`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from surgery.bundle import bundled_recipe, read_manifest
from surgery.inputs import InputSpec
from surgery.predict_batch import PredictSettings, progress_bar, row_transform, run_batch
from surgery.predict_inputs import PredictInput, expand_inputs, read_input
from surgery.predict_output import PredictionWriter, columns

ACTOR_CPUS = 1


class BundlePredictor:
    """A Ray Data actor: the bundle loaded once, then one batch of rows in, their predictions out."""

    def __init__(self, bundle: str, settings: PredictSettings, threads: int = ACTOR_CPUS) -> None:
        import torch

        from surgery.runner import open_runner

        torch.set_num_threads(max(1, threads))
        self.runner = open_runner(Path(bundle), settings.runtime)
        self.settings = settings
        self.columns = [name for name, _ in columns(self.runner.heads, settings.top_k)]
        self.transform = row_transform(self.runner.spec)

    def __call__(self, batch: dict[str, Any]) -> Any:
        import pandas as pd

        names = [str(n) for n in batch["name"]]
        decoded = []
        for name, item, error in zip(names, batch["item"], batch["error"], strict=True):
            entry = PredictInput(name, json.loads(item), str(error) if error else None)
            try:
                decoded.append((read_input(entry, self.runner.spec, self.transform), None))
            except Exception as err:  # one bad input is one row's error, never the job's
                decoded.append((None, str(err) or type(err).__name__))
        rows = run_batch(self.runner, names, decoded, self.settings)
        frame = pd.DataFrame([{c: row.get(c) for c in self.columns} for row in rows], columns=self.columns)
        frame["index"] = list(batch["index"])
        return frame


def _item(entry: PredictInput, spec: InputSpec) -> str:
    if spec.kind == "image" and entry.item is not None:
        return json.dumps(str(Path(entry.item).resolve()))
    return json.dumps(entry.item)


def predict_on_ray(
    bundle: Path, inputs: list[str], out: Path | None, settings: PredictSettings, concurrency: int
) -> tuple[int, int, float]:
    """Predict on Ray Data with `concurrency` actors; (rows, rows with an error, seconds)."""
    import ray

    from surgery.cluster import start_ray
    from surgery.errors import SurgeryError

    if concurrency < 1:
        raise SurgeryError("--concurrency must be at least 1")
    started = time.perf_counter()
    manifest = read_manifest(bundle)
    spec = InputSpec.from_dict(manifest["input"])
    entries = expand_inputs(inputs, spec, column=settings.column, recipe=bundled_recipe(bundle))
    cols = columns(list(manifest["heads"]), settings.top_k)
    items = [
        {"index": i, "name": e.name, "item": _item(e, spec), "error": e.error or ""} for i, e in enumerate(entries)
    ]
    owned = start_ray(worker_logs=False)
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its progress lines would bury the output
    writer = PredictionWriter(out, cols)
    try:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # rows come back in input order
        context.enable_progress_bars = False
        dataset = ray.data.from_items(items).map_batches(
            BundlePredictor,
            fn_constructor_kwargs={"bundle": str(bundle), "settings": settings},
            batch_size=settings.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            num_cpus=ACTOR_CPUS,
        )
        names = [name for name, _ in cols]
        with progress_bar(len(entries)) as advance:
            for frame in dataset.iter_batches(batch_format="pandas", batch_size=None):
                rows = [{n: _none(row.get(n)) for n in names} for row in frame.to_dict("records")]
                writer.write(rows)
                advance(len(rows))
    except BaseException:
        writer.abort()
        raise
    finally:
        if owned:
            ray.shutdown()
    writer.close()
    return writer.count, writer.errors, time.perf_counter() - started


def _none(value: Any) -> Any:
    """pandas' missing values (NaN in a float column, None or NaN in a text one) as None."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    return value.item() if hasattr(value, "item") else value
