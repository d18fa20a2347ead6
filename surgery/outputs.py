"""Model outputs to what a person reads: each classification head's probabilities with the label
of each column. Plain numpy, no torch: serving's `/v1` responses and offline `surgery predict`
rank labels with this one implementation, so both give the same top-k for the same outputs."""

from __future__ import annotations

from typing import Any

import numpy as np


def _softmax(values: np.ndarray) -> np.ndarray:
    shifted = np.exp(values - values.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-values))


def head_probabilities(head: dict[str, Any], values: np.ndarray) -> tuple[np.ndarray, list[str]] | None:
    """(probabilities N×K, label per column) for a classification head's outputs N×…, else None.
    `head` is a manifest head (`task`, `labels`); a multilabel head's labels each get their own
    sigmoid."""
    task = head.get("task")
    if task not in ("multiclass", "binary", "multilabel"):
        return None
    values = values.astype(np.float64).reshape(values.shape[0], -1)
    labels = list(head.get("labels") or [])
    width = values.shape[1]
    if task == "multiclass":
        probs = _softmax(values)
    elif width == 1 and task == "binary":  # one logit: P(positive) and its complement
        p = _sigmoid(values)
        probs, width = np.concatenate([1 - p, p], axis=1), 2
    else:  # independent labels
        probs = _sigmoid(values)
    names = labels if len(labels) == width else [str(i) for i in range(width)]
    return probs, names


def ranked_columns(probs: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest probabilities of each row, largest first (ties: lower index)."""
    return np.argsort(-probs, axis=1, kind="stable")[:, : min(k, probs.shape[1])]
