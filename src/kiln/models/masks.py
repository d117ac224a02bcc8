"""Attention masks and positions shared by the model families: segment ids and positions,
causal, prefix-LM, padding and cached masks, their additive bias, and rotary embeddings.

Shape suffixes as in `layers.py`: B batch, L length (queries), S length (keys/values), H heads,
E head_dim.
"""

import jax
import jax.numpy as jnp

# Additive bias for masked attention logits. Finite, so fully masked rows give a uniform
# softmax instead of NaN, and large enough that exp(NEG_INF - max) is exactly 0 in float32.
NEG_INF = -1e9


def apply_rope(x_BLHE: jax.Array, positions_BL: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, half-split: (x[i], x[i + E/2]) rotates by pos * theta^(-2i/E)."""
    half = x_BLHE.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BLE = positions_BL.astype(jnp.float32)[..., None] * inv_freq
    sin_BL1E, cos_BL1E = jnp.sin(angle_BLE)[:, :, None], jnp.cos(angle_BLE)[:, :, None]
    x1, x2 = jnp.split(x_BLHE.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos_BL1E - x2 * sin_BL1E, x2 * cos_BL1E + x1 * sin_BL1E], -1)
    return out.astype(x_BLHE.dtype)


def segments_and_positions(
    shape: tuple[int, int], segment_ids_BL: jax.Array | None, positions_BL: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Segment ids (None: one document per row) and positions (None: arange) for [B, L]."""
    if segment_ids_BL is None:
        segment_ids_BL = jnp.ones(shape, jnp.int32)
    if positions_BL is None:
        positions_BL = jnp.broadcast_to(jnp.arange(shape[1]), shape)
    return segment_ids_BL, positions_BL


def causal_mask(segment_ids_BL: jax.Array) -> jax.Array:
    """Boolean [B, 1, L, L]: t attends to s iff s <= t and both lie in the same segment.

    Padding (segment 0) attends to earlier padding only, so no row is fully masked.
    """
    length = segment_ids_BL.shape[-1]
    causal_LL = jnp.tril(jnp.ones((length, length), dtype=bool))
    return padding_mask(segment_ids_BL, segment_ids_BL) & causal_LL


def prefix_lm_mask(segment_ids_BL: jax.Array, prefix_mask_BL: jax.Array) -> jax.Array:
    """Boolean [B, 1, L, L]: `causal_mask`, plus every prefix key of the query's own segment.

    t attends to s iff same segment and (s <= t or prefix_mask[s]): the prefix of each document
    is read bidirectionally, its continuation causally.
    """
    same_segment_B1LL = padding_mask(segment_ids_BL, segment_ids_BL)
    prefix_B11S = prefix_mask_BL.astype(bool)[:, None, None, :]
    return causal_mask(segment_ids_BL) | (same_segment_B1LL & prefix_B11S)


def padding_mask(q_segment_ids_BL: jax.Array, kv_segment_ids_BS: jax.Array) -> jax.Array:
    """Boolean [B, 1, L, S]: a query attends to the keys of its own segment (0 is padding)."""
    return q_segment_ids_BL[:, None, :, None] == kv_segment_ids_BS[:, None, None, :]


def cached_causal_mask(
    q_segment_ids_BL: jax.Array, kv_segment_ids_BS: jax.Array, index: jax.Array
) -> jax.Array:
    """Boolean [B, 1, L, S] over S cache slots, for queries in slots [index, index + L).

    Query t attends to slot s iff s <= index + t and both lie in the same segment, so real
    tokens never see padding (segment 0) or unwritten slots; `causal_mask` if index = 0, S = L.
    """
    q_slots_L1 = index + jnp.arange(q_segment_ids_BL.shape[-1])[:, None]
    causal_LS = jnp.arange(kv_segment_ids_BS.shape[-1]) <= q_slots_L1
    return padding_mask(q_segment_ids_BL, kv_segment_ids_BS) & causal_LS


def mask_to_bias(mask: jax.Array) -> jax.Array:
    """Boolean mask -> additive float32 bias: 0 where allowed, NEG_INF where masked."""
    return jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)


def prompt_bias(bias_BHLS: jax.Array, prompt_length: int) -> jax.Array:
    """`bias_BHLS` (H may be 1) widened to [prompt; queries] x [prompt; keys], P = prompt_length:
    prompt positions attend to the prompt only (so they never depend on the input) and every
    query attends to the whole prompt besides the keys its own bias allows."""
    b, h, length, keys = bias_BHLS.shape
    p = prompt_length
    dtype = bias_BHLS.dtype
    top = [jnp.zeros((b, h, p, p), dtype), jnp.full((b, h, p, keys), NEG_INF, dtype)]
    bottom = [jnp.zeros((b, h, length, p), dtype), bias_BHLS]
    return jnp.concatenate([jnp.concatenate(top, -1), jnp.concatenate(bottom, -1)], axis=2)
