"""Validation metrics per head, computed from all of an epoch's outputs at once.

Tasks (from `SurgicalModel.head_info`): `multiclass` outputs are logits [N, C] with class-index
targets; `binary` outputs are one logit per sample with 0/1 targets; `multilabel` outputs are
[N, K] logits with 0/1 targets; `regression` outputs are compared with targets of the same size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from surgery.heads import HeadInfo, task_of
from surgery.registry import METRICS
from surgery.schema import Recipe


def _labels(outputs: Tensor, targets: Tensor, task: str) -> tuple[Tensor, Tensor]:
    """Predicted and true labels (class indices, or 0/1 per label)."""
    if task == "multiclass":
        return outputs.argmax(-1), targets.long().view(-1)
    predicted = (outputs > 0).long().reshape(-1)
    return predicted, targets.long().reshape(-1)


@METRICS.implements("accuracy")
def accuracy(outputs: Tensor, targets: Tensor, task: str) -> float:
    predicted, true = _labels(outputs, targets, task)
    return (predicted == true).float().mean().item()


@METRICS.implements("top5")
def top5(outputs: Tensor, targets: Tensor, task: str) -> float:
    if task != "multiclass":
        return accuracy(outputs, targets, task)
    k = min(5, outputs.shape[-1])
    hits = (outputs.topk(k, dim=-1).indices == targets.long().view(-1, 1)).any(-1)
    return hits.float().mean().item()


@METRICS.implements("f1_macro")
def f1_macro(outputs: Tensor, targets: Tensor, task: str) -> float:
    if task == "multilabel":
        predicted, true = (outputs > 0).long(), targets.long().reshape(outputs.shape)
        return torch.stack([_f1(predicted[:, j], true[:, j], 1) for j in range(outputs.shape[-1])]).mean().item()
    predicted, true = _labels(outputs, targets, task)
    classes = outputs.shape[-1] if task == "multiclass" else 2
    present = [c for c in range(classes) if (true == c).any() or (predicted == c).any()]
    return torch.stack([_f1(predicted, true, c) for c in present]).mean().item() if present else 0.0


def _f1(predicted: Tensor, true: Tensor, cls: int) -> Tensor:
    tp = ((predicted == cls) & (true == cls)).sum().float()
    fp = ((predicted == cls) & (true != cls)).sum().float()
    fn = ((predicted != cls) & (true == cls)).sum().float()
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom > 0 else torch.tensor(0.0)


def _same_shape(outputs: Tensor, targets: Tensor) -> Tensor:
    targets = targets.to(outputs.dtype)
    return targets.reshape(outputs.shape) if targets.numel() == outputs.numel() else targets


@METRICS.implements("mse")
def mse(outputs: Tensor, targets: Tensor, task: str) -> float:
    return (outputs.float() - _same_shape(outputs.float(), targets)).pow(2).mean().item()


@METRICS.implements("mae")
def mae(outputs: Tensor, targets: Tensor, task: str) -> float:
    return (outputs.float() - _same_shape(outputs.float(), targets)).abs().mean().item()


def compute_metric(name: str, outputs: Tensor, targets: Tensor, task: str) -> float:
    """One metric over a whole set of outputs and targets."""
    return float(METRICS.get(name)(outputs.detach().cpu(), targets.detach().cpu(), task))


class MetricTracker:
    """Collects each head's outputs and targets over batches; `compute()` gives
    `{"val/<head>/<metric>": value}`."""

    def __init__(self, recipe: Recipe, head_info: dict[str, HeadInfo] | None = None) -> None:
        self.heads = [(h.name, list(h.metrics), h.loss.name) for h in recipe.heads]
        self.head_info = head_info or {}
        self.reset()

    def reset(self) -> None:
        self._outputs: dict[str, list[Tensor]] = {name: [] for name, _, _ in self.heads}
        self._targets: dict[str, list[Tensor]] = {name: [] for name, _, _ in self.heads}

    def update(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> None:
        for name, metrics, _ in self.heads:
            if metrics and name in targets:
                self._outputs[name].append(outputs[name].detach().float().cpu())
                self._targets[name].append(targets[name].detach().cpu())

    def _task(self, name: str, loss: str, outputs: Tensor) -> str:
        info = self.head_info.get(name)
        return info.task if info else task_of(loss, int(outputs.shape[-1]) if outputs.dim() > 1 else 1)

    def compute(self) -> dict[str, float]:
        result: dict[str, float] = {}
        for name, metrics, loss in self.heads:
            if not self._outputs[name]:
                continue
            outputs, targets = torch.cat(self._outputs[name]), torch.cat(self._targets[name])
            task = self._task(name, loss, outputs)
            for metric in metrics:
                result[f"val/{name}/{metric}"] = compute_metric(metric, outputs, targets, task)
        return result


def collected(tracker: MetricTracker) -> dict[str, tuple[Tensor, Tensor, str]]:
    """Each head's validation outputs and targets over the whole epoch, with its task."""
    result = {}
    for name, _metrics, loss in tracker.heads:
        if tracker._outputs[name]:
            outputs, targets = torch.cat(tracker._outputs[name]), torch.cat(tracker._targets[name])
            result[name] = (outputs, targets, tracker._task(name, loss, outputs))
    return result


def class_scores(outputs: Tensor, targets: Tensor, task: str) -> tuple[Tensor, Tensor]:
    """(probabilities [N, C], true class [N]) of a single-label classification head: multiclass
    logits through softmax, a binary head's one logit as two classes."""
    if task == "multiclass":
        return outputs.float().softmax(-1), targets.long().view(-1)
    p = outputs.float().sigmoid().reshape(-1)
    return torch.stack([1 - p, p], dim=1), targets.long().reshape(-1)


def confusion_matrix(predicted: Tensor, true: Tensor, classes: int) -> Tensor:
    """[true class, predicted class] counts."""
    index = true.long() * classes + predicted.long()
    return torch.bincount(index, minlength=classes * classes).reshape(classes, classes)


def per_class(matrix: Tensor) -> dict[str, Tensor]:
    """Precision, recall and F1 of each class from a confusion matrix (0 where undefined)."""
    m = matrix.double()
    tp = m.diag()
    predicted, actual = m.sum(0), m.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    return {"precision": precision, "recall": recall, "f1": f1}
