"""Attention: multi-head with grouped kv heads, and its KV cache.

Shape suffixes as in `layers.py`: B batch, L queries, S keys/values, H heads, K kv heads,
G query groups (H // K), E head_dim, D d_model.
"""

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from kiln.errors import KilnError
from kiln.models import layers
from kiln.models.layers import TransformerConfig


def _write_slots(cache_BS: jax.Array, new_BL: jax.Array, index: jax.Array) -> jax.Array:
    """cache_BS with new_BL written at slots [index, index + L) of axis 1."""
    start = (0, index) + (0,) * (cache_BS.ndim - 2)
    return jax.lax.dynamic_update_slice(cache_BS, new_BL.astype(cache_BS.dtype), start)


class CacheSlots(nn.Module):
    """Decode-mode bookkeeping of a stack's KV cache in the "cache" collection.

    Holds `index` (the next free slot, shared by all layers) and the segment id and position of
    every slot [B, S_max]. Each call writes its [B, L] segment ids and positions at slots
    [index, index + L) and advances index by L; the caller must keep index + L <= S_max (a
    write past the end is clamped by `dynamic_update_slice` and corrupts the cache).

    The cache is a fixed array of S_max slots rather than a growing one, so every decode step
    has the same shapes and compiles once; the per-slot segment ids and positions let the mask
    (`layers.cached_causal_mask`) and position biases treat padded prompts and unwritten slots
    correctly without knowing how far each row has got.

    The first call, when the cache does not exist yet, creates it with S_max = L and writes
    nothing, so the model computes an ordinary forward pass (the flax examples' convention).
    """

    @nn.compact
    def __call__(
        self, segment_ids_BL: jax.Array, positions_BL: jax.Array | None
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """Returns (index before this call, positions [B, L], segment ids and positions [B, S]).

        positions_BL None means the slot numbers index + arange(L): unpadded rows continuing
        their cached sequence.
        """
        shape = segment_ids_BL.shape
        exists = self.has_variable("cache", "index")
        index = self.variable("cache", "index", jnp.zeros, (), jnp.int32)
        segment_ids = self.variable("cache", "segment_ids", jnp.zeros, shape, jnp.int32)
        positions = self.variable("cache", "positions", jnp.zeros, shape, jnp.int32)
        start = index.value if exists else jnp.zeros((), jnp.int32)
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(start + jnp.arange(shape[1]), shape)
        if not exists:
            return start, positions_BL, segment_ids_BL, positions_BL
        segment_ids.value = _write_slots(segment_ids.value, segment_ids_BL, start)
        positions.value = _write_slots(positions.value, positions_BL, start)
        index.value = start + shape[1]
        return start, positions_BL, segment_ids.value, positions.value


class Attention(nn.Module):
    """Multi-head attention with grouped kv heads (MHA, GQA, MQA); self or cross."""

    config: TransformerConfig

    @nn.compact
    def __call__(
        self,
        xq_BLD: jax.Array,
        xkv_BSD: jax.Array,
        bias: jax.Array | None = None,
        q_positions_BL: jax.Array | None = None,
        kv_positions_BS: jax.Array | None = None,
        *,
        deterministic: bool = True,
        decode: bool = False,
        cache_index: jax.Array | None = None,
        static_kv: bool = False,
    ) -> jax.Array:
        """Attends queries from xq to keys/values from xkv.

        Args:
          xq_BLD: query inputs.
          xkv_BSD: key/value inputs (the same array for self-attention).
          bias: additive float32 bias broadcastable to [B, H, L, S]: a mask from `mask_to_bias`,
            optionally plus a relative position bias.
          q_positions_BL: if given, rope is applied to q and k.
          kv_positions_BS: positions of the keys for rope; defaults to q_positions_BL.
          deterministic: disables dropout on the attention probabilities.
          decode: self-attention with a KV cache: this call's keys (after rope) and values are
            written to the "cache" variables `cached_key` / `cached_value` [B, S_max, K, E] at
            slots [cache_index, cache_index + L) and the queries attend to all S_max slots, so
            `bias` must cover [B, H, L, S_max] (see `CacheSlots`, `layers.cached_causal_mask`). The
            call that creates the cache sets S_max = L and attends over this call's keys only.
          cache_index: int32 scalar, the first slot this call writes; required when decoding.
          static_kv: with decode, for cross-attention: the call that creates the cache stores
            the keys/values of xkv as `cross_key` / `cross_value` [B, S, K, E]; later calls read
            them and ignore xkv (the encoder output does not change while decoding).

        Returns:
          Output [B, L, D] in the compute dtype.
        """
        cfg = self.config
        h, e = cfg.n_heads, cfg.head_dim
        q_names = ("embed", "heads", "head_dim")
        q_BLHE = layers.make_dense(cfg, (h, e), -1, q_names, cfg.init_std, "query")(xq_BLD)
        k_BSKE, v_BSKE = self._keys_and_values(xkv_BSD, cross_cache=decode and static_kv)
        if q_positions_BL is not None:
            q_BLHE = layers.apply_rope(q_BLHE, q_positions_BL, cfg.rope_theta)
            kv_pos_BS = q_positions_BL if kv_positions_BS is None else kv_positions_BS
            k_BSKE = layers.apply_rope(k_BSKE, kv_pos_BS, cfg.rope_theta)
        if decode and not static_kv:
            k_BSKE, v_BSKE = self._cached_kv(k_BSKE, v_BSKE, cache_index)
        out_BLHE = self._attend(q_BLHE, k_BSKE, v_BSKE, bias, deterministic)
        std_out = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        out_names = ("heads", "head_dim", "embed")
        return layers.make_dense(cfg, cfg.d_model, (-2, -1), out_names, std_out, "out")(out_BLHE)

    def _keys_and_values(
        self, xkv_BSD: jax.Array, cross_cache: bool
    ) -> tuple[jax.Array, jax.Array]:
        """Keys and values [B, S, K, E] of xkv; with `cross_cache` (decoding cross-attention)
        computed and stored by the call that creates the cache, then read back by later calls."""
        if cross_cache and self.has_variable("cache", "cross_key"):
            k_BSKE = self.get_variable("cache", "cross_key")
            return k_BSKE, self.get_variable("cache", "cross_value")
        cfg = self.config
        k, e = cfg.n_kv_heads, cfg.head_dim
        kv_names = ("embed", "kv_heads", "head_dim")
        k_BSKE = layers.make_dense(cfg, (k, e), -1, kv_names, cfg.init_std, "key")(xkv_BSD)
        v_BSKE = layers.make_dense(cfg, (k, e), -1, kv_names, cfg.init_std, "value")(xkv_BSD)
        if cross_cache:
            self.put_variable("cache", "cross_key", k_BSKE)
            self.put_variable("cache", "cross_value", v_BSKE)
        return k_BSKE, v_BSKE

    def _cached_kv(
        self, k_BLKE: jax.Array, v_BLKE: jax.Array, index: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """Writes this call's keys/values into the cache; returns all slots [B, S_max, K, E].

        Keys are cached after rope: each is rotated once, by its own position, and a later
        query needs only its own position to attend to them.
        """
        exists = self.has_variable("cache", "cached_key")
        key = self.variable("cache", "cached_key", jnp.zeros, k_BLKE.shape, k_BLKE.dtype)
        value = self.variable("cache", "cached_value", jnp.zeros, v_BLKE.shape, v_BLKE.dtype)
        if not exists:  # Creating the cache: S_max = L, nothing written.
            return k_BLKE, v_BLKE
        if index is None:
            raise KilnError("Attention: decode=True needs cache_index.")
        key.value = _write_slots(key.value, k_BLKE, index)
        value.value = _write_slots(value.value, v_BLKE, index)
        return key.value, value.value

    def _attend(
        self,
        q_BLHE: jax.Array,
        k_BSKE: jax.Array,
        v_BSKE: jax.Array,
        bias: jax.Array | None,
        deterministic: bool,
    ) -> jax.Array:
        """softmax(q k^T * scale + bias) v [B, L, H, E], on the path this backend runs best."""
        cfg = self.config
        scale = 1 / math.sqrt(cfg.head_dim) if cfg.scale_attention else 1.0
        dropout_active = cfg.dropout > 0 and not deterministic
        if use_dot_product_attention() and not dropout_active:
            return jax.nn.dot_product_attention(
                q_BLHE.astype(cfg.dtype),
                k_BSKE.astype(cfg.dtype),
                v_BSKE.astype(cfg.dtype),
                bias=None if bias is None else bias.astype(cfg.dtype),
                scale=scale,
            )
        dropout = nn.Dropout(cfg.dropout)
        return _attention(
            q_BLHE * jnp.asarray(scale, q_BLHE.dtype),
            k_BSKE,
            v_BSKE,
            bias,
            lambda p: dropout(p, deterministic=deterministic),
            cfg.dtype,
        )


def use_dot_product_attention() -> bool:
    """Whether attention goes through `jax.nn.dot_product_attention` (cuDNN's fused kernel
    where it applies, else XLA's): on GPUs. Elsewhere kiln's own attention (`_attention`),
    faster on CPUs (benchmarks/RESULTS.md); both compute the same function."""
    return jax.default_backend() == "gpu"


def _attention(
    q_BLHE: jax.Array,
    k_BSKE: jax.Array,
    v_BSKE: jax.Array,
    bias: jax.Array | None,
    dropout: Callable[[jax.Array], jax.Array],
    dtype: layers.Dtype,
) -> jax.Array:
    """softmax(q k^T + bias) v with grouped kv heads; q already scaled."""
    b, length, h, e = q_BLHE.shape
    k, keys = k_BSKE.shape[2], k_BSKE.shape[1]
    g = h // k
    # Batched matmuls over one leading axis (B * K): XLA's CPU backend runs these (and their
    # gradients) ~1.5x faster than the same einsum over [B, K, G, L, S].
    k_NSE = jnp.swapaxes(k_BSKE, 1, 2).reshape(b * k, -1, e)
    v_NSE = jnp.swapaxes(v_BSKE, 1, 2).reshape(b * k, -1, e).astype(dtype)
    # Query head n uses kv head n // G: [B, L, K, G, E] -> [B * K, G * L, E].
    q_BLKGE = q_BLHE.reshape(b, length, k, g, e)
    q_NQE = jnp.transpose(q_BLKGE, (0, 2, 3, 1, 4)).reshape(b * k, g * length, e)
    # Logits and softmax in float32: in bf16 the exp overflows sooner and the row sums lose
    # precision (8 mantissa bits), which biases the attention weights.
    logits_NQS = jnp.einsum("nqe,nse->nqs", q_NQE, k_NSE, preferred_element_type=jnp.float32)
    logits_BHLS = logits_NQS.reshape(b, h, length, keys)
    if bias is not None:
        logits_BHLS = logits_BHLS + bias.astype(jnp.float32)
    probs_BHLS = dropout(jax.nn.softmax(logits_BHLS, axis=-1))
    probs_NQS = probs_BHLS.reshape(b * k, g * length, keys).astype(dtype)
    out_BKGLE = jnp.einsum("nqs,nse->nqe", probs_NQS, v_NSE).reshape(b, k, g, length, e)
    return jnp.transpose(out_BKGLE, (0, 3, 1, 2, 4)).reshape(b, length, h, e)
