"""One head's evaluation in numbers (metrics, per-class scores, confusion matrix) and the printed
report. The metric functions and the confusion image are the ones training's validation uses."""

from __future__ import annotations

import io
from typing import Any

import torch

from surgery.metrics import class_scores, compute_metric, confusion_matrix, per_class

DEFAULT_METRICS = {
    "multiclass": ["accuracy", "f1_macro"],
    "binary": ["accuracy", "f1_macro"],
    "multilabel": ["accuracy", "f1_macro"],
    "regression": ["mse", "mae"],
}
PRINTED_CLASSES = 20  # a bigger confusion matrix is in the JSON and the PNG only


def head_report(
    head: dict[str, Any], metrics: list[str], outputs: torch.Tensor, targets: torch.Tensor, examples: Any
) -> tuple[dict[str, Any], bytes | None]:
    """(the head's report, its confusion matrix as PNG bytes or None)."""
    task = head.get("task") or "regression"
    names = list(dict.fromkeys([*DEFAULT_METRICS.get(task, []), *metrics]))
    report: dict[str, Any] = {
        "task": task,
        "metrics": {m: compute_metric(m, outputs, targets, task) for m in names},
    }
    if task in ("multiclass", "binary"):
        probs, true = class_scores(outputs, targets, task)
        labels = _labels(head, examples, probs.shape[1])
        matrix = confusion_matrix(probs.argmax(1), true, probs.shape[1])
        report.update(_per_class(matrix, labels), confusion_matrix=matrix.tolist())
        return report, _png(matrix, labels)
    if task == "multilabel":
        predicted, true = (outputs > 0).long(), targets.long().reshape(outputs.shape)
        labels = _labels(head, examples, outputs.shape[1])
        tp = ((predicted == 1) & (true == 1)).sum(0).double()
        matrix = torch.stack([tp, ((predicted == 1) & (true == 0)).sum(0), ((predicted == 0) & (true == 1)).sum(0)])
        report.update(_multilabel(matrix.double(), true.sum(0), labels))
    return report, None


def _labels(head: dict[str, Any], examples: Any, width: int) -> list[str]:
    names = head.get("labels") or examples.class_names.get(head["name"]) or []
    return [str(names[c]) if c < len(names) else str(c) for c in range(width)]


def _per_class(matrix: torch.Tensor, labels: list[str]) -> dict[str, Any]:
    scores = per_class(matrix)
    support = matrix.sum(1).tolist()
    return {
        "classes": labels,
        "per_class": {
            label: {**{k: float(v[c]) for k, v in scores.items()}, "support": int(support[c])}
            for c, label in enumerate(labels)
        },
    }


def _multilabel(counts: torch.Tensor, support: torch.Tensor, labels: list[str]) -> dict[str, Any]:
    tp, fp, fn = counts
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    return {
        "classes": labels,
        "per_class": {
            label: {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(support[c]),
            }
            for c, label in enumerate(labels)
        },
    }


def _png(matrix: torch.Tensor, labels: list[str]) -> bytes:
    """The confusion matrix drawn as training's TensorBoard image is (PIL; no matplotlib needed)."""
    from PIL import Image

    from surgery.monitor import confusion_image

    pixels = (confusion_image(matrix, labels) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy(), "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def print_report(report: dict[str, Any]) -> str:
    """The report as a person reads it: metrics, per-class table, small confusion matrices."""
    lines = [f"{report['model']} on {report['data']}: {report['samples']} samples"]
    for name, head in report["heads"].items():
        shown = "  ".join(f"{k} {v:.4g}" for k, v in head["metrics"].items())
        lines.append(f"{name} ({head['task']}): {shown}")
        if "per_class" not in head:
            continue
        width = max(5, *(len(label) for label in head["per_class"]))
        lines.append(f"  {'class':<{width}}  precision  recall  f1      support")
        for label, s in head["per_class"].items():
            lines.append(
                f"  {label:<{width}}  {s['precision']:<9.4f}  {s['recall']:<6.4f}  {s['f1']:<6.4f}  {s['support']}"
            )
        matrix = head.get("confusion_matrix")
        if matrix is not None and len(matrix) <= PRINTED_CLASSES:
            cell = max(4, *(len(str(v)) for row in matrix for v in row), *(len(c[:6]) for c in head["classes"]))
            lines.append("  confusion (rows: true, columns: predicted)")
            lines.append(f"  {'':<{width}}  " + " ".join(f"{c[:6]:>{cell}}" for c in head["classes"]))
            for label, row in zip(head["classes"], matrix, strict=True):
                lines.append(f"  {label:<{width}}  " + " ".join(f"{v:>{cell}}" for v in row))
    return "\n".join(lines)
