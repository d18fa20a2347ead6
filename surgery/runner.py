"""The model runner seam of `evaluate` and offline `predict`: a loaded bundle that turns one batch
of model inputs into each head's outputs.

Batch prediction and evaluation talk only to `ModelRunner`, never to the torch model, so another
runtime (ONNX Runtime, int8) drops in as another runner without touching them. Outputs are numpy
arrays: what every runtime can hand back.
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

    def run(self, inputs: tuple[Any, ...]) -> dict[str, np.ndarray]:
        """One batch of model inputs (torch tensors, first dimension = samples) -> outputs per head."""
        ...


@dataclass
class TorchRunner:
    """The bundle's own torch model (eager, CPU), under inference mode."""

    name: str
    spec: InputSpec
    heads: list[dict[str, Any]]
    tokenizer: Any
    recipe: Any
    model: Any

    def run(self, inputs: tuple[Any, ...]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            outputs = self.model(*inputs)
        return {h["name"]: outputs[h["name"]].float().numpy() for h in self.heads}


def open_runner(bundle: Path) -> ModelRunner:
    """Verify and load a bundle (`surgery.bundle.load_bundle`) as a runner."""
    from surgery.bundle import load_bundle

    loaded = load_bundle(Path(bundle))
    return TorchRunner(
        name=loaded.manifest["name"],
        spec=loaded.input_spec,
        heads=list(loaded.manifest["heads"]),
        tokenizer=loaded.tokenizer,
        recipe=loaded.recipe,
        model=loaded.model,
    )
