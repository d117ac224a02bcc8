"""Losses, as sums (not means), so microbatches and hosts add up exactly.

A `LossFn` takes (model, params, batch, dropout rng or None) and returns float32 sums:
`loss_sum`, `correct_sum`, `weight_sum` (and, for a classifier, each row's predicted class as
`classes`). The train and eval steps call the one `kiln.build` picks for the run
(`language_model`, `replaced_token_detection` for ELECTRA, or `classifier`, which is
`regression` on float targets), so a loss that is not token cross-entropy needs a new
`LossFn`, never an edit of the trainer.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Batch = dict[str, jax.Array]
LossFn = Callable[[nn.Module, Any, Batch, jax.Array | None], dict[str, jax.Array]]
SUM_KEYS = ("loss_sum", "correct_sum", "weight_sum")
LABEL_KEYS = ("targets", "weights")


def apply_model(
    model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None, **kwargs: Any
) -> Any:
    """The model's output for a batch; every key but targets/weights is a model argument.
    Dropout iff `rng`."""
    return model.apply(
        {"params": params},
        **{k: v for k, v in batch.items() if k not in LABEL_KEYS},
        deterministic=rng is None,
        rngs=None if rng is None else {"dropout": rng},
        **kwargs,
    )


def language_model(loss_chunks: int = 0) -> LossFn:
    """Token cross-entropy of a language model's logits [B, L, V] against `targets` [B, L]
    weighted by `weights`; with `loss_chunks` > 0, fused with the output projection in that
    many sequence chunks, so the full logits never exist (`fused_cross_entropy_sums`)."""

    def loss(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None) -> dict:
        if loss_chunks:
            head = apply_model(model, params, batch, rng, head_inputs=True)
            return fused_cross_entropy_sums(*head, batch["targets"], batch["weights"], loss_chunks)
        logits = apply_model(model, params, batch, rng)
        return cross_entropy_sums(logits, batch["targets"], batch["weights"])

    return loss


def replaced_token_detection(mask_rate: float, rtd_weight: float) -> LossFn:
    """ELECTRA's loss (`kiln.models.electra.Electra` on masked-LM batches): the generator's
    masked-LM cross-entropy plus `rtd_weight` times the discriminator's binary cross-entropy
    on every real token (segment id > 0) of whether the generator's sample replaced it.

    The sums stay additive over microbatches: the detection sum enters scaled by `mask_rate`,
    so that after the trainer divides by `weight_sum` (the selected tokens, about `mask_rate`
    of the real ones) the loss is about the generator's mean plus `rtd_weight` times the
    detection mean, the paper's weighting. `correct_sum` counts the generator's correct tokens;
    evaluation also reports `generator_loss`, `detection_loss` and `detection_accuracy`.
    The generator samples from a key split off the dropout key (key 0 in evaluation)."""

    def loss(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None) -> dict:
        dropout_rng, sample_key = (None, None) if rng is None else jax.random.split(rng)
        out = apply_model(
            model,
            params,
            batch,
            dropout_rng,
            original=batch["targets"],
            selected=batch["weights"],
            sample_key=sample_key,
        )
        sums = cross_entropy_sums(out.generator_logits, batch["targets"], batch["weights"])
        real_BL = (batch["segment_ids"] > 0).astype(jnp.float32)
        detection_BL = optax.sigmoid_binary_cross_entropy(
            out.detection_logits, out.replaced.astype(jnp.float32)
        )
        detection_sum = jnp.sum(detection_BL * real_BL)
        detected_BL = (out.detection_logits > 0) == (out.replaced > 0)
        real_count = jnp.sum(real_BL)
        return {
            **sums,
            "loss_sum": sums["loss_sum"] + rtd_weight * mask_rate * detection_sum,
            # Reported by evaluation as generator_loss, detection_loss, detection_accuracy.
            "generator_loss_sum": sums["loss_sum"],
            "generator_loss_count": sums["weight_sum"],
            "detection_loss_sum": detection_sum,
            "detection_loss_count": real_count,
            "detection_accuracy_sum": jnp.sum(detected_BL * real_BL),
            "detection_accuracy_count": real_count,
        }

    return loss


def classifier(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None) -> dict:
    """Cross-entropy of a classification head's logits [B, C] against the class `targets` [B]
    (weight per row), and each row's predicted class; float `targets` make it `regression`."""
    if jnp.issubdtype(batch["targets"].dtype, jnp.floating):
        return regression(model, params, batch, rng)
    logits_BC = apply_model(model, params, batch, rng)
    sums = cross_entropy_sums(logits_BC, batch["targets"], batch["weights"])
    return {**sums, "classes": jnp.argmax(logits_BC, axis=-1)}


def regression(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None) -> dict:
    """Squared error of a one-output head [B, 1] against the float `targets` [B] (weight per
    row) as `loss_sum`; `correct_sum` is 0 (no notion of correct); each row's value as
    `classes`."""
    predicted_B = apply_model(model, params, batch, rng)[:, 0].astype(jnp.float32)
    weights_B = batch["weights"].astype(jnp.float32)
    error_B = predicted_B - batch["targets"].astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(weights_B * error_B * error_B),
        "correct_sum": jnp.zeros((), jnp.float32),
        "weight_sum": jnp.sum(weights_B),
        "classes": predicted_B,
    }


def _token_terms(
    logits_BLV: jax.Array, targets_BL: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per token of float32 logits: cross-entropy, correctness (the target's logit is the row
    maximum; one max serves this and the stable log-sum-exp, no argmax pass) and the softmax."""
    max_BL1 = jax.lax.stop_gradient(jnp.max(logits_BLV, axis=-1, keepdims=True))
    exp_BLV = jnp.exp(logits_BLV - max_BL1)
    sum_BL1 = jnp.sum(exp_BLV, axis=-1, keepdims=True)
    target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    nll_BL = (max_BL1 + jnp.log(sum_BL1))[..., 0] - target_logit_BL
    correct_BL = (target_logit_BL >= max_BL1[..., 0]).astype(jnp.float32)
    return nll_BL, correct_BL, exp_BLV / sum_BL1


def cross_entropy_sums(
    logits_BLV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array
) -> dict[str, jax.Array]:
    """Weighted sums of token cross-entropy and of correct predictions (the target's logit is
    the row maximum), in float32."""
    weights_BL = weights_BL.astype(jnp.float32)
    nll_BL, correct_BL, _ = _token_terms(logits_BLV.astype(jnp.float32), targets_BL)
    return {
        "loss_sum": jnp.sum(nll_BL * weights_BL),
        "correct_sum": jnp.sum(correct_BL * weights_BL),
        "weight_sum": jnp.sum(weights_BL),
    }


def fused_cross_entropy_sums(
    x_BLD: jax.Array,
    table_VD: jax.Array,
    bias_V: jax.Array | None,
    targets_BL: jax.Array,
    weights_BL: jax.Array,
    chunks: int,
) -> dict[str, jax.Array]:
    """`cross_entropy_sums` of the logits x . table^T (+ bias), without ever holding them all.

    The sequence is cut into `chunks` pieces, each [B, ceil(L / chunks), V] of logits over all
    batch rows (so batch sharding is kept; L is padded with weight-0 tokens). Under
    differentiation each piece's gradients (with respect to x, the table and the bias) are
    computed in the same pass as its loss and kept instead of the logits, so the backward pass
    only scales them: no logits are stored or recomputed. A target whose logit ties the row
    maximum counts as correct.
    """
    pad = -x_BLD.shape[1] % chunks
    if pad:
        x_BLD, targets_BL, weights_BL = (
            jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
            for a in (x_BLD, targets_BL, weights_BL)
        )
    bias_V = jnp.zeros(table_VD.shape[0], jnp.float32) if bias_V is None else bias_V
    loss_sum, correct_sum = _fused_ce(x_BLD, table_VD, bias_V, targets_BL, weights_BL, chunks)
    return {
        "loss_sum": loss_sum,
        "correct_sum": correct_sum,
        "weight_sum": jnp.sum(weights_BL.astype(jnp.float32)),
    }


def _chunk_terms(x_BCD, table_VD, bias_V, targets_BC, weights_BC):
    """Per-token nll and correctness of one chunk, and the gradients of their weighted sum."""
    logits = jnp.einsum("bcd,vd->bcv", x_BCD, table_VD, preferred_element_type=jnp.float32)
    logits = logits + bias_V.astype(jnp.float32)
    nll_BC, correct_BC, softmax_BCV = _token_terms(logits, targets_BC)
    # d nll / d logits = softmax - one_hot(target), times the weight.
    one_hot_BCV = targets_BC[..., None] == jnp.arange(table_VD.shape[0])
    dlogits_BCV = (softmax_BCV - one_hot_BCV) * weights_BC[..., None]
    dx_BCD = jnp.einsum("bcv,vd->bcd", dlogits_BCV, table_VD.astype(jnp.float32))
    dtable_VD = jnp.einsum("bcv,bcd->vd", dlogits_BCV, x_BCD.astype(jnp.float32))
    return nll_BC, correct_BC, dx_BCD, dtable_VD, jnp.sum(dlogits_BCV, axis=(0, 1))


def _fused_ce_forward(x_BLD, table_VD, bias_V, targets_BL, weights_BL, chunks):
    weights_BL = weights_BL.astype(jnp.float32)
    size = x_BLD.shape[1] // chunks

    # Chunks are slices of the length axis, so every chunk keeps the batch sharding.
    def body(carry, i):
        dtable_VD, dbias_V, dx_BLD, nll_BL, correct_BL = carry
        start = i * size
        piece = [
            jax.lax.dynamic_slice_in_dim(a, start, size, axis=1)
            for a in (x_BLD, targets_BL, weights_BL)
        ]
        nll, correct, dx, dtable, dbias = _chunk_terms(piece[0], table_VD, bias_V, *piece[1:])
        # Without this constraint XLA's SPMD partitioner produced wrong dx for BERT on a
        # (2, 2, 2) data x fsdp x tensor mesh at some chunk sizes (tests/test_train.py).
        dx = nn.with_logical_constraint(dx, ("act_batch", "act_length", "act_embed"))
        dx_BLD = jax.lax.dynamic_update_slice_in_dim(dx_BLD, dx, start, axis=1)
        nll_BL = jax.lax.dynamic_update_slice_in_dim(nll_BL, nll, start, axis=1)
        correct_BL = jax.lax.dynamic_update_slice_in_dim(correct_BL, correct, start, axis=1)
        return (dtable_VD + dtable, dbias_V + dbias, dx_BLD, nll_BL, correct_BL), None

    f32 = functools.partial(jnp.zeros, dtype=jnp.float32)
    init = (
        f32(table_VD.shape),
        f32(bias_V.shape),
        f32(x_BLD.shape),
        f32(weights_BL.shape),
        f32(weights_BL.shape),
    )
    (dtable_VD, dbias_V, dx_BLD, nll_BL, correct_BL), _ = jax.lax.scan(
        body, init, jnp.arange(chunks)
    )
    sums = (jnp.sum(nll_BL * weights_BL), jnp.sum(correct_BL * weights_BL))
    return sums, (dx_BLD, dtable_VD, dbias_V, nll_BL)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _fused_ce(x_BLD, table_VD, bias_V, targets_BL, weights_BL, chunks):
    return _fused_ce_forward(x_BLD, table_VD, bias_V, targets_BL, weights_BL, chunks)[0]


def _fused_ce_fwd(x_BLD, table_VD, bias_V, targets_BL, weights_BL, chunks):
    sums, grads = _fused_ce_forward(x_BLD, table_VD, bias_V, targets_BL, weights_BL, chunks)
    primals = (x_BLD, table_VD, bias_V, weights_BL)
    return sums, tuple(grad.astype(p.dtype) for grad, p in zip(grads, primals))


def _fused_ce_bwd(chunks, residuals, cotangents):
    g = cotangents[0]  # correct_sum is piecewise constant: no gradient
    dx_BLD, dtable_VD, dbias_V, nll_BL = ((g * r).astype(r.dtype) for r in residuals)
    return dx_BLD, dtable_VD, dbias_V, None, nll_BL


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)
