"""The model runner seam of `evaluate` and offline `predict`: a loaded bundle that turns one batch
of model inputs into each head's outputs.

Batch prediction and evaluation talk only to `ModelRunner`, never to the torch model: the runtime
under it (eager torch, ONNX Runtime, int8) is chosen by `surgery.runtimes` exactly as each serving
replica chooses, so offline and served predictions run the same way. Outputs are numpy arrays:
what every runtime hands back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from surgery.inputs import InputSpec


class ModelRunner(Protocol):
    """A bundle ready to run: what it takes, what it gives, and one batch at a time."""

    name: str
    spec: InputSpec
    heads: list[dict[str, Any]]  # manifest heads: name, task, labels, out_features
    tokenizer: Any  # text models' tokenizer (batches are tokenised before `run`), else None
    recipe: Any  # the bundled resolved recipe (its `data:` says what the model was trained on)
    choice: Any  # `surgery.runtimes.RuntimeChoice`: which runtime runs, and why

    def run(self, inputs: tuple[Any, ...]) -> dict[str, np.ndarray]:
        """One batch of model inputs (torch tensors, first dimension = samples) -> outputs per head."""
        ...


@dataclass
class RuntimeRunner:
    """A bundle on the runtime `surgery.runtimes` chose for it (eager torch, ONNX Runtime, int8),
    as `surgery serve` chooses for each replica: `choice` says which and why."""

    name: str
    spec: InputSpec
    heads: list[dict[str, Any]]
    tokenizer: Any
    recipe: Any
    runtime: Any  # a `surgery.runtimes.Runtime`
    choice: Any  # its `RuntimeChoice`
    threads: int

    def run(self, inputs: tuple[Any, ...]) -> dict[str, np.ndarray]:
        return self.runtime.run(inputs, self.threads)


def open_runner(bundle: Path, runtime: str | None = None) -> ModelRunner:
    """Verify and load a bundle (`surgery.bundle.load_bundle`) on `runtime` (`auto`, `torch`,
    `onnxruntime`, `onnxruntime-int8`; default: the bundled recipe's `serve.runtime`, else `auto`,
    which times each runtime the bundle allows on this process's threads and keeps the fastest)."""
    import torch

    from surgery.bundle import bundled_recipe, load_bundle
    from surgery.errors import SurgeryError
    from surgery.runtimes import CHOICES, choose_runtime

    path = Path(bundle)
    requested = runtime or bundled_recipe(path).serve.runtime or "auto"
    if requested not in CHOICES:
        raise SurgeryError(f"--runtime {requested}: choose one of {', '.join(CHOICES)}")
    loaded = load_bundle(path, torch_model=requested in ("auto", "torch"))
    threads = torch.get_num_threads()
    chosen, choice = choose_runtime(loaded, requested, threads=threads)
    return RuntimeRunner(
        name=loaded.manifest["name"],
        spec=loaded.input_spec,
        heads=list(loaded.manifest["heads"]),
        tokenizer=loaded.tokenizer,
        recipe=loaded.recipe,
        runtime=chosen,
        choice=choice,
        threads=threads,
    )
