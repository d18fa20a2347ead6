"""Allowlisted names a recipe may use, each resolved to a builder inside this package.

A recipe selects behaviour only by name: an optimizer, a loss, a backbone source. Each kind of
name has one `Registry`. Its names (with a line of documentation each) are declared here, so that
validating a recipe needs no torch; the builders are attached by the module that owns the
behaviour (`@OPTIMIZERS.implements("adamw")`) and that module is imported only when a builder is
first asked for. A recipe can never name a module or a callable, only a key of a registry.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable
from typing import Any


class UnknownNameError(ValueError):
    """A name that is not in a registry; the message lists close matches."""


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """` (did you mean 'a', 'b'?)` for the closest choices, or an empty string."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.6)
    if not close:
        lowered = name.lower()
        close = [c for c in choices if lowered and (lowered in c.lower() or c.lower() in lowered)][:n]
    if not close:
        return ""
    return " (did you mean " + ", ".join(repr(c) for c in close) + "?)"


class Registry:
    """Names of one kind (`optimizer`, `loss`, ...) → builders owned by one module."""

    def __init__(self, kind: str, owner: str, names: dict[str, str]) -> None:
        self.kind = kind
        self.owner = owner  # module that attaches the builders; imported on first `get`
        self.docs = dict(names)
        self._builders: dict[str, Callable[..., Any]] = {}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.docs)

    def __contains__(self, name: object) -> bool:
        return name in self.docs

    def unknown(self, name: str) -> UnknownNameError:
        return UnknownNameError(f"unknown {self.kind} {name!r}{did_you_mean(name, self.docs)}")

    def implements(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: attach the builder for a declared name."""
        if name not in self.docs:
            raise self.unknown(name)

        def attach(fn: Callable[..., Any]) -> Callable[..., Any]:
            self._builders[name] = fn
            return fn

        return attach

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self.docs:
            raise self.unknown(name)
        if name not in self._builders:
            importlib.import_module(self.owner)
        try:
            return self._builders[name]
        except KeyError:
            raise NotImplementedError(
                f"{self.kind} {name!r} is declared but {self.owner} has no builder for it"
            ) from None

    def describe(self) -> str:
        return "; ".join(f"`{k}`: {v}" for k, v in self.docs.items())


BACKBONE_SOURCES = Registry(
    "backbone source",
    "surgery.backbones",
    {
        "timm": "a `timm.create_model` name (any of `timm.list_models()`)",
        "torchvision": "a `torchvision.models.get_model` name",
        "transformers": "a Hugging Face `AutoModel` hub id or local folder (never remote code)",
        "tabular": "`mlp`: a feature-vector input (`data.feature_columns`), per-column normalisation fitted on the training split, an MLP trunk",
    },
)

LAYERS = Registry(
    "layer",
    "surgery.heads",
    {
        "linear": "fully connected layer; `in_features` is inferred",
        "mlp": "stack of linear layers with activation, norm and dropout between them",
        "dropout": "dropout with probability `p`",
        "layernorm": "LayerNorm over the last dimension",
        "batchnorm": "BatchNorm1d/2d, chosen by the input's rank",
        "relu": "ReLU activation",
        "gelu": "GELU activation",
        "silu": "SiLU (swish) activation",
        "tanh": "tanh activation",
        "sigmoid": "sigmoid activation",
        "identity": "does nothing (what `remove` puts in a module's place)",
        "conv1x1": "1×1 convolution over a feature map; `in_channels` is inferred",
        "avgpool": "global average pooling of a feature map to a vector",
        "maxpool": "global max pooling of a feature map to a vector",
        "flatten": "flatten all but the batch dimension",
    },
)

LOSSES = Registry(
    "loss",
    "surgery.heads",
    {
        "cross_entropy": "multi-class classification from logits (targets: class indices)",
        "bce_with_logits": "binary / multi-label classification from logits (targets: 0/1 floats)",
        "mse": "mean squared error regression",
        "l1": "mean absolute error regression",
        "smooth_l1": "Huber-style regression loss",
    },
)

METRICS = Registry(
    "metric",
    "surgery.metrics",
    {
        "accuracy": "top-1 accuracy (multi-class) or thresholded accuracy (binary)",
        "top5": "top-5 accuracy",
        "f1_macro": "macro-averaged F1 over classes",
        "mse": "mean squared error",
        "mae": "mean absolute error",
    },
)

OPTIMIZERS = Registry(
    "optimizer",
    "surgery.optim",
    {
        "sgd": "SGD with momentum and Nesterov options",
        "adam": "Adam",
        "adamw": "AdamW (decoupled weight decay)",
        "rmsprop": "RMSprop",
    },
)

SCHEDULERS = Registry(
    "scheduler",
    "surgery.optim",
    {
        "constant": "constant learning rate (after warmup)",
        "cosine": "cosine decay to `min_lr` over the run (after warmup)",
        "linear": "linear decay to `min_lr` over the run (after warmup)",
        "step": "multiply by `gamma` every `step_epochs` epochs",
        "onecycle": "one-cycle policy peaking at the optimizer's lr",
    },
)

DATA_SOURCES = Registry(
    "data source",
    "surgery.data",
    {
        "digits": "scikit-learn's 8×8 handwritten digits (1,797 images, 10 classes); offline",
        "image_folder": "class-per-folder images under `train` (and `val`, or a seeded split)",
        "csv": "a CSV/TSV file: an image-path, text or numeric feature column(s), and label column(s)",
        "jsonl": "a JSON-lines file: an image-path, text or numeric feature field(s), and label field(s)",
        "parquet": "a Parquet file (pyarrow): an image-path, text or feature column(s), and label column(s)",
        "hf": "a Hugging Face `datasets` dataset: a `save_to_disk` folder, Arrow/Parquet files, or `hf.name` (needs the `hf` extra)",
        "synthetic": "random tensors of the model's input shape, for tests and benchmarks",
    },
)

AUGMENTATIONS = Registry(
    "augmentation",
    "surgery.data_augment",
    {
        "hflip": "random horizontal flip with probability `p`",
        "vflip": "random vertical flip with probability `p`",
        "random_resized_crop": "random crop of `scale` area, resized to the input size",
        "random_crop": "random crop after zero `padding`",
        "rotate": "random rotation up to `degrees`",
        "color_jitter": "random brightness/contrast/saturation",
        "gaussian_noise": "additive gaussian noise with std `std` (after normalisation)",
    },
)

EXPORT_FORMATS = Registry(
    "export format",
    "surgery.export_formats",
    {
        "safetensors": "weights + manifest (always written)",
        "onnx": "ONNX via torch.onnx.export (a dynamic batch axis unless `export.dynamic_batch: false`), verified in onnxruntime",
        "torchscript": "TorchScript (traced), verified against eager",
        "pt2": "torch.export ExportedProgram (.pt2), verified against eager",
    },
)

ALL_REGISTRIES = (
    BACKBONE_SOURCES,
    LAYERS,
    LOSSES,
    METRICS,
    OPTIMIZERS,
    SCHEDULERS,
    DATA_SOURCES,
    AUGMENTATIONS,
    EXPORT_FORMATS,
)
