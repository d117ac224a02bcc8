import numpy as np

from kiln import losses


def test_cross_entropy_sums_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, size=(2, 5))
    weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
    sums = losses.cross_entropy_sums(logits, targets, weights)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(sums["loss_sum"], (nll * weights).sum(), rtol=1e-5)
    correct = (logits.argmax(-1) == targets) * weights
    assert float(sums["correct_sum"]) == correct.sum()
    assert float(sums["weight_sum"]) == weights.sum()
