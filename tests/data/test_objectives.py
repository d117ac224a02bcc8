"""Tests for kiln.data.objectives."""

import numpy as np
import pytest

from kiln.data.objectives import causal_lm


def random_packed_batch(rng: np.random.Generator, batch: int, length: int) -> dict:
    """Rows of consecutive segments (ids from 1) with random lengths, then padding (segment 0)."""
    tokens = np.zeros((batch, length), np.int32)
    segment_ids = np.zeros((batch, length), np.int32)
    positions = np.zeros((batch, length), np.int32)
    for b in range(batch):
        used = length if b == 0 else int(rng.integers(0, length + 1))  # row 0 has no padding
        t, seg = 0, 1
        while t < used:
            n = min(int(rng.integers(1, 8)), used - t)
            tokens[b, t : t + n] = rng.integers(4, 1000, n)
            segment_ids[b, t : t + n] = seg
            positions[b, t : t + n] = np.arange(n)
            t, seg = t + n, seg + 1
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


def reference_causal_lm(batch: dict) -> tuple[np.ndarray, np.ndarray]:
    tokens, seg = batch["tokens"], batch["segment_ids"]
    rows, length = tokens.shape
    targets = np.zeros((rows, length), np.int64)
    weights = np.zeros((rows, length), np.float64)
    for b in range(rows):
        for t in range(length):
            if t + 1 < length:
                targets[b, t] = tokens[b, t + 1]
                if seg[b, t] != 0 and seg[b, t + 1] == seg[b, t]:
                    weights[b, t] = 1.0
    return targets, weights


@pytest.mark.parametrize("seed", range(5))
def test_causal_lm_matches_reference(seed):
    rng = np.random.default_rng(seed)
    batch = random_packed_batch(rng, batch=6, length=int(rng.integers(2, 40)))
    out = causal_lm(batch)
    targets, weights = reference_causal_lm(batch)

    assert set(out) == {"inputs", "targets", "weights", "segment_ids", "positions"}
    assert out["inputs"].dtype == out["targets"].dtype == np.int32
    assert out["weights"].dtype == np.float32
    np.testing.assert_array_equal(out["inputs"], batch["tokens"])
    np.testing.assert_array_equal(out["targets"], targets)
    np.testing.assert_array_equal(out["weights"], weights)
    np.testing.assert_array_equal(out["segment_ids"], batch["segment_ids"])
    np.testing.assert_array_equal(out["positions"], batch["positions"])


def test_causal_lm_small_example():
    batch = {
        "tokens": np.array([[2, 10, 11, 3, 2, 12, 0, 0]], np.int32),
        "segment_ids": np.array([[1, 1, 1, 1, 2, 2, 0, 0]], np.int32),
        "positions": np.array([[0, 1, 2, 3, 0, 1, 0, 0]], np.int32),
    }
    out = causal_lm(batch)
    np.testing.assert_array_equal(out["targets"], [[10, 11, 3, 2, 12, 0, 0, 0]])
    np.testing.assert_array_equal(out["weights"], [[1, 1, 1, 0, 1, 0, 0, 0]])


def test_causal_lm_does_not_modify_input():
    batch = random_packed_batch(np.random.default_rng(0), batch=3, length=16)
    before = {k: v.copy() for k, v in batch.items()}
    causal_lm(batch)
    for k, v in batch.items():
        np.testing.assert_array_equal(v, before[k])
