"""Pre-training objectives: pure NumPy transforms of packed batches.

Each objective takes a packed batch (``tokens``, ``segment_ids``, ``positions``; ``[B, L]``
int32, segment 0 = padding) and returns the model's ``inputs``, ``targets`` and float32 loss
``weights``, with ``segment_ids`` and ``positions`` passed through.
"""

from __future__ import annotations

import numpy as np


def causal_lm(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Next-token prediction over packed documents.

    ``targets[:, t] = tokens[:, t + 1]`` (last column 0). A position has weight 1 only if the
    next token exists and belongs to the same non-padding segment, so the loss never crosses a
    document boundary or predicts padding.
    """
    tokens = np.asarray(batch["tokens"], dtype=np.int32)
    segment_ids = np.asarray(batch["segment_ids"], dtype=np.int32)
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    weights = np.zeros(tokens.shape, dtype=np.float32)
    same = (segment_ids[:, :-1] != 0) & (segment_ids[:, 1:] == segment_ids[:, :-1])
    weights[:, :-1] = same
    return {
        "inputs": tokens,
        "targets": targets,
        "weights": weights,
        "segment_ids": segment_ids,
        "positions": np.asarray(batch["positions"], dtype=np.int32),
    }
