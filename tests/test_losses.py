import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def _numpy_loss_and_grads(x, table, bias, targets, weights):
    """Loss sum of softmax(x . table^T + bias) and its gradients, by hand in float64."""
    x, table, bias = (a.astype(np.float64) for a in (x, table, bias))
    logits = x @ table.T + bias
    shifted = logits - logits.max(-1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)
    nll = -np.log(np.take_along_axis(probs, targets[..., None], -1)[..., 0])
    dlogits = probs.copy()
    np.put_along_axis(
        dlogits, targets[..., None], np.take_along_axis(probs, targets[..., None], -1) - 1, -1
    )
    dlogits *= weights[..., None]
    grads = (dlogits @ table, np.einsum("blv,bld->vd", dlogits, x), dlogits.sum((0, 1)), nll)
    return (nll * weights).sum(), grads


@pytest.mark.parametrize("chunks", [1, 3, 4, 16])
def test_fused_cross_entropy_matches_numpy_loss_and_gradients(chunks):
    """Values and gradients (x, table, bias, weights) of the chunked, fused loss equal a NumPy
    computation, for chunk counts that do and do not divide the length (16)."""
    rng = np.random.default_rng(chunks)
    x = rng.normal(size=(3, 16, 8)).astype(np.float32)
    table = rng.normal(size=(40, 8)).astype(np.float32)
    bias = rng.normal(size=40).astype(np.float32)
    targets = rng.integers(0, 40, size=(3, 16)).astype(np.int32)
    weights = (rng.random((3, 16)) > 0.3).astype(np.float32)

    def loss(x, table, bias, weights):
        sums = losses.fused_cross_entropy_sums(x, table, bias, targets, weights, chunks)
        return sums["loss_sum"], sums

    (value, sums), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
        x, table, bias, weights
    )
    want, want_grads = _numpy_loss_and_grads(x, table, bias, targets, weights)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    for got, expected in zip(grads, want_grads):
        np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)
    plain = losses.cross_entropy_sums(x @ table.T + bias, targets, weights)
    assert float(sums["correct_sum"]) == float(plain["correct_sum"])
    assert float(sums["weight_sum"]) == weights.sum()


def test_fused_cross_entropy_without_bias_keeps_dtypes():
    """No bias; bfloat16 inputs give bfloat16 gradients, close to the float32 ones."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 8)).astype(np.float32)
    table = rng.normal(size=(24, 8)).astype(np.float32)
    targets = rng.integers(0, 24, size=(2, 8)).astype(np.int32)
    weights = np.ones((2, 8), np.float32)

    def grads(dtype):
        def loss(x, table):
            sums = losses.fused_cross_entropy_sums(x, table, None, targets, weights, 2)
            return sums["loss_sum"]

        return jax.grad(loss, argnums=(0, 1))(x.astype(dtype), table.astype(dtype))

    low, full = grads(jnp.bfloat16), grads(jnp.float32)
    assert [g.dtype for g in low] == [jnp.bfloat16, jnp.bfloat16]
    _, (want_dx, want_dtable, *_) = _numpy_loss_and_grads(x, table, np.zeros(24), targets, weights)
    np.testing.assert_allclose(full[0], want_dx, atol=1e-5)
    np.testing.assert_allclose(np.asarray(low[1], np.float32), want_dtable, atol=0.1, rtol=0.05)
