"""Validation metrics per task and the per-epoch tracker."""

from __future__ import annotations

import pytest
import torch

from surgery.metrics import MetricTracker, compute_metric
from surgery.schema import Recipe


def test_multiclass_accuracy_top5_f1() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 2.0, 1.0], [1.0, 0.0, 3.0]])
    targets = torch.tensor([0, 1, 2, 2])
    assert compute_metric("accuracy", logits, targets, "multiclass") == pytest.approx(0.75)
    assert compute_metric("top5", logits, targets, "multiclass") == pytest.approx(1.0)
    # per class F1: class 0 = 1, class 1 = 2/3, class 2 = 2/3
    assert compute_metric("f1_macro", logits, targets, "multiclass") == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_binary_and_multilabel_threshold_logits_at_zero() -> None:
    assert compute_metric(
        "accuracy", torch.tensor([[2.0], [-1.0], [0.5]]), torch.tensor([1, 0, 0]), "binary"
    ) == pytest.approx(2 / 3)
    logits = torch.tensor([[1.0, -1.0], [1.0, 1.0]])
    targets = torch.tensor([[1, 0], [0, 1]])
    assert compute_metric("accuracy", logits, targets, "multilabel") == pytest.approx(0.75)
    assert compute_metric("f1_macro", logits, targets, "multilabel") == pytest.approx((2 / 3 + 1) / 2)


def test_regression_metrics() -> None:
    outputs, targets = torch.tensor([[1.0], [2.0]]), torch.tensor([0.0, 4.0])
    assert compute_metric("mse", outputs, targets, "regression") == pytest.approx(2.5)
    assert compute_metric("mae", outputs, targets, "regression") == pytest.approx(1.5)


def test_tracker_accumulates_batches_and_names_keys() -> None:
    recipe = Recipe.model_validate(
        {
            "name": "t",
            "backbone": {"source": "timm", "name": "test_resnet", "pretrained": False},
            "heads": [
                {
                    "name": "kind",
                    "layers": [{"linear": {"out_features": 3}}],
                    "loss": "cross_entropy",
                    "metrics": ["accuracy", "f1_macro"],
                },
                {"name": "score", "layers": [{"linear": {"out_features": 1}}], "loss": "mse", "metrics": ["mae"]},
            ],
        }
    )
    tracker = MetricTracker(recipe)
    tracker.update(
        {"kind": torch.tensor([[5.0, 0, 0]]), "score": torch.tensor([[1.0]])},
        {"kind": torch.tensor([0]), "score": torch.tensor([0.0])},
    )
    tracker.update(
        {"kind": torch.tensor([[5.0, 0, 0]]), "score": torch.tensor([[1.0]])},
        {"kind": torch.tensor([1]), "score": torch.tensor([3.0])},
    )
    result = tracker.compute()
    assert set(result) == {"val/kind/accuracy", "val/kind/f1_macro", "val/score/mae"}
    assert result["val/kind/accuracy"] == pytest.approx(0.5)
    assert result["val/score/mae"] == pytest.approx(1.5)
    tracker.reset()
    assert tracker.compute() == {}
