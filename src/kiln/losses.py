"""Token-level losses, as sums (not means), so microbatches and hosts add up exactly."""

import jax
import jax.numpy as jnp


def cross_entropy_sums(
    logits_BLV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array
) -> dict[str, jax.Array]:
    """Weighted sums of token cross-entropy and of correct argmax predictions, in float32."""
    logits_BLV = logits_BLV.astype(jnp.float32)
    weights_BL = weights_BL.astype(jnp.float32)
    log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    nll_BL = log_z_BL - target_logit_BL
    correct_BL = (jnp.argmax(logits_BLV, axis=-1) == targets_BL).astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(nll_BL * weights_BL),
        "correct_sum": jnp.sum(correct_BL * weights_BL),
        "weight_sum": jnp.sum(weights_BL),
    }
