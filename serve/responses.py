"""Model outputs to `/v1` response bodies: every head's raw values, and for classification heads
(multilabel ones too) the top-k labels with probabilities. Plain numpy; no Ray, no torch."""

from __future__ import annotations

from typing import Any

import numpy as np

from surgery.outputs import head_probabilities, ranked_columns


def head_rows(head: dict[str, Any], values: np.ndarray, top_k: int) -> list[dict[str, Any]]:
    """Per-row `/v1` output of one head: raw values, plus top-k labels for classification heads;
    a multilabel head also `labels`, every label over 0.5 (as offline predict's `<head>_labels`)."""
    raw = values.astype(np.float32).reshape(values.shape[0], -1).tolist()
    classified = head_probabilities(head, values)
    if classified is None:
        return [{"output": row} for row in raw]
    probs, names = classified
    order = ranked_columns(probs, top_k)
    rows = []
    for row, p_row, i_row in zip(raw, probs, order, strict=True):
        ranked = [{"label": names[i], "probability": float(p_row[i])} for i in i_row]
        rows.append({"output": row, "top_k": ranked})
        if head.get("task") == "multilabel":
            rows[-1]["labels"] = [name for name, p in zip(names, p_row, strict=True) if p > 0.5]
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
