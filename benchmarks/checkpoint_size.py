"""Frozen-backbone checkpoint size against what training changes (target: ≤ 1.2× the bytes of
the trainable parameters plus their optimizer state), and against a checkpoint holding every
tensor (what checkpoints stored before), written in the same run from the same trained model.

Each case trains one short epoch with `fit`, then measures the last checkpoint's folder; the
"whole" baseline is `save_checkpoint` of the same model and trainer state without the frozen
reference.

    python benchmarks/checkpoint_size.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from surgery import checkpoint as ckpt
from surgery.recipe import load_recipe, load_recipe_text
from surgery.train import fit

RESNET18 = """
name: ckpt-size
backbone: {{source: timm, name: resnet18, pretrained: false}}  # offline: the frozen weights' values do not matter here
input: {{size: [32, 32]}}
freeze: ["backbone.**"]
heads: [{{name: cls, input: pooled, layers: [{{linear: {{out_features: {classes}}}}}], loss: cross_entropy}}]
data: {{source: synthetic, batch_size: 16, synthetic: {{num_samples: 32, num_classes: {classes}}}}}
train: {{epochs: 1, seed: 0, optimizer: {{name: adamw, lr: 0.001}}}}
monitor: {{progress: none, graph: false, histograms: false, sample_predictions: 0}}
"""


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def trained_bytes(checkpoint: Path) -> int:
    """Bytes of the trainable parameters and of the optimizer's per-parameter state."""
    from safetensors.torch import load_file

    trainer = torch.load(checkpoint / ckpt.TRAINER_FILE, weights_only=True)
    state = trainer["optimizer"]["state"]
    optimizer = sum(t.numel() * t.element_size() for s in state.values() for t in s.values() if t.dim() > 0)
    stored = load_file(str(checkpoint / ckpt.MODEL_FILE))
    return sum(t.numel() * t.element_size() for t in stored.values()) + optimizer


def measure(name: str, recipe, root: Path) -> None:
    from surgery.model import build_model

    run = root / name
    last = fit(recipe, run).last_checkpoint
    lean = folder_bytes(last)
    model = build_model(recipe)
    trainer, meta = ckpt.load_checkpoint(last, model)
    whole_dir = ckpt.save_checkpoint(
        root / f"{name}-whole",
        model=model,
        trainer_state=trainer,
        meta={k: v for k, v in meta.items() if k not in ("files", "complete", "frozen")},
        recipe_text=(last / ckpt.RECIPE_FILE).read_text(),
        monitor="val/loss",
        mode="min",
        keep_best=1,
    )
    whole = folder_bytes(whole_dir)
    base = trained_bytes(last)
    print(
        f"| {name} | {lean / 1024:,.1f} KiB | {base / 1024:,.1f} KiB | **{lean / base:.2f}×** | "
        f"{whole / 1024:,.1f} KiB ({whole / lean:.0f}× the lean one) |"
    )


def main() -> None:
    print("| model | lean checkpoint | trainable params + optimizer state | ratio | every tensor (before) |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        quick = load_recipe(
            Path(__file__).parent.parent / "recipes" / "quickstart.yaml",
            ["freeze=[backbone.**]", "train.epochs=1", "monitor.progress=none", "data.limit_train=64"],
        )
        measure("quickstart, backbone frozen (970 trainable)", quick, root)
        for classes in (10, 100, 1000):
            recipe = load_recipe_text(RESNET18.format(classes=classes))
            measure(f"resnet18 frozen + linear 512→{classes}", recipe, root)


if __name__ == "__main__":
    main()
