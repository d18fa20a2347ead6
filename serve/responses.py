"""Model outputs to `/v1` response bodies: every head's raw values, and for classification heads
the top-k labels with probabilities. Plain numpy; no Ray, no torch."""

from __future__ import annotations

from typing import Any

import numpy as np


def _softmax(values: np.ndarray) -> np.ndarray:
    shifted = np.exp(values - values.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-values))


def head_probabilities(head: dict[str, Any], values: np.ndarray) -> tuple[np.ndarray, list[str]] | None:
    """(probabilities N×K, label per column) for a classification head's outputs N×…, else None."""
    task = head.get("task")
    if task not in ("multiclass", "binary"):
        return None
    values = values.astype(np.float64).reshape(values.shape[0], -1)
    labels = list(head.get("labels") or [])
    width = values.shape[1]
    if task == "multiclass":
        probs = _softmax(values)
    elif width == 1:  # one logit: P(positive) and its complement
        p = _sigmoid(values)
        probs, width = np.concatenate([1 - p, p], axis=1), 2
    else:  # independent labels
        probs = _sigmoid(values)
    names = labels if len(labels) == width else [str(i) for i in range(width)]
    return probs, names


def head_rows(head: dict[str, Any], values: np.ndarray, top_k: int) -> list[dict[str, Any]]:
    """Per-row `/v1` output of one head: raw values, plus top-k labels for classification heads."""
    raw = values.astype(np.float32).reshape(values.shape[0], -1).tolist()
    classified = head_probabilities(head, values)
    if classified is None:
        return [{"output": row} for row in raw]
    probs, names = classified
    k = min(top_k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    rows = []
    for row, p_row, i_row in zip(raw, probs, order, strict=True):
        ranked = [{"label": names[i], "probability": float(p_row[i])} for i in i_row]
        rows.append({"output": row, "top_k": ranked})
    return rows


def v1_predictions(
    name: str, heads: list[dict[str, Any]], outputs: dict[str, np.ndarray], batch_sizes: list[int], top_k: int
) -> dict[str, Any]:
    """The `/v1` predict response for one request's rows."""
    per_head = {h["name"]: head_rows(h, outputs[h["name"]], top_k) for h in heads}
    n = len(batch_sizes)
    return {
        "model": name,
        "predictions": [{head: per_head[head][i] for head in per_head} for i in range(n)],
        "batch_sizes": batch_sizes,
    }


def server_timing(timings: dict[str, float]) -> str:
    """A `Server-Timing` header value from phase durations in ms."""
    return ", ".join(f"{key};dur={value:.2f}" for key, value in timings.items())
