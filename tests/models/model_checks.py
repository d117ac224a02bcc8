"""Invariants every family's tests check the same way."""

import numpy as np


def assert_pad_ids_do_not_change_outputs(apply, params, positions: np.ndarray) -> None:
    """Changing the ids of padding tokens (segment 0) leaves every non-pad output unchanged."""
    seg = np.array([[0] * 3 + [1] * 9 + [0] * 4, [0] * 16])  # Left and right pads; all pads.
    tokens = np.random.default_rng(1).integers(1, 64, size=seg.shape)
    other = np.where(seg == 0, np.random.default_rng(2).integers(1, 64, size=seg.shape), tokens)
    logits = np.asarray(apply(params, tokens, seg, positions))
    logits_other = np.asarray(apply(params, other, seg, positions))
    assert np.isfinite(logits).all() and np.isfinite(logits_other).all()
    assert not np.allclose(logits[seg == 0], logits_other[seg == 0])  # The pad ids did change.
    np.testing.assert_allclose(logits[seg != 0], logits_other[seg != 0], rtol=0, atol=1e-6)
