"""The `synthetic` source: random inputs shaped like the model's, for tests and benchmarks."""

from __future__ import annotations

from typing import Any

import torch

from surgery.data_examples import Examples
from surgery.errors import DataError
from surgery.inputs import InputSpec
from surgery.registry import DATA_SOURCES
from surgery.schema import Recipe


@DATA_SOURCES.implements("synthetic")
def synthetic_source(recipe: Recipe, model: Any) -> tuple[Examples, Examples]:
    """Random inputs shaped like the model's example inputs; the first classification head's
    classes shift the inputs, so the task is learnable (useful for tests and benchmarks)."""
    data = recipe.data
    assert data is not None
    n_train = data.synthetic.num_samples
    n_val = max(1, n_train // 4)
    n = n_train + n_val
    gen = torch.Generator().manual_seed(data.split_seed)
    spec: InputSpec = model.input_spec
    examples = [t.detach().cpu() for t in model.example_inputs(1)]
    targets: dict[str, torch.Tensor] = {}
    class_of: torch.Tensor | None = None
    for name, info in model.head_info.items():
        task, out = info.task, info.out_features
        if task == "multiclass":
            if data.synthetic.num_classes > out:
                raise DataError(
                    f"data.synthetic.num_classes {data.synthetic.num_classes} exceeds head {name!r} outputs ({out})"
                )
            targets[name] = torch.randint(data.synthetic.num_classes, (n,), generator=gen)
            class_of = targets[name] if class_of is None else class_of
        elif task == "binary":
            shape = (n,) if out == 1 else (n, out)
            targets[name] = torch.randint(2, shape, generator=gen).to(torch.float32)
        else:
            shape = (n,) if out == 1 else (n, out)
            targets[name] = torch.randn(shape, generator=gen)
    if spec.kind == "text":
        length = min(16, spec.max_length)
        vocab = int(getattr(model.tokenizer, "vocab_size", 0) or 1000)
        ids = torch.randint(1, vocab, (n, length), generator=gen)
        if class_of is not None:
            ids[:, 0] = 1 + class_of  # the class is readable from the first token
        inputs: tuple[torch.Tensor, ...] = (ids, torch.ones(n, length, dtype=torch.long))
    else:
        shape = tuple(examples[0].shape[1:])
        x = torch.randn((n, *shape), generator=gen)
        if class_of is not None:
            prototypes = torch.randn((int(class_of.max()) + 1, *shape), generator=gen)
            x = x + prototypes[class_of]
        inputs = (x.to(examples[0].dtype),)
    all_examples = Examples("tensor", inputs, targets, {})
    return all_examples.subset(range(n_train)), all_examples.subset(range(n_train, n))
