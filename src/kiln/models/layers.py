"""Transformer layers shared by the GPT, BERT and T5 families.

Shape suffixes: B batch, L length (queries), S length (keys/values), D d_model, H heads,
K kv heads, G query groups (H // K), E head_dim, F d_ff, V vocab.
"""

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kiln.errors import KilnError

# Additive bias for masked attention logits. Finite, so fully masked rows give a uniform
# softmax instead of NaN, and large enough that exp(NEG_INF - max) is exactly 0 in float32.
NEG_INF = -1e9

Dtype = jnp.dtype | str

_POSITIONS = ("learned", "rope", "none")
_NORMS = ("layernorm", "rmsnorm")
_MLPS = ("gelu", "relu", "swiglu", "geglu")
_NORM_POSITIONS = ("pre", "post")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
}

# Logical names of the [B, L, D] activations between blocks.
ACT_NAMES = ("act_batch", "act_length", "act_embed")


class HeadInputs(NamedTuple):
    """What a language model's logits are made of: x . table^T + bias, in the compute dtype;
    `losses.fused_cross_entropy_sums` takes these instead of the logits."""

    x_BLD: jax.Array
    table_VD: jax.Array
    bias_V: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture of a transformer; shared by all model families."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int  # n_heads: MHA, 1: MQA, in between: GQA.
    d_ff: int
    max_len: int  # Rows of the learned position table / longest sequence.
    position: str = "learned"  # "learned" | "rope" | "none"
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    mlp: str = "gelu"  # "gelu" | "relu" | "swiglu" | "geglu"
    use_bias: bool = True  # Biases of dense layers and of layernorm.
    tie_embeddings: bool = True
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    dtype: str = "float32"  # Compute dtype.
    param_dtype: str = "float32"
    norm_position: str = "pre"  # "pre": x + f(norm(x)) | "post": norm(x + f(x)), classic BERT.
    type_vocab_size: int = 0  # Rows of the token-type table; 0: no token types (BERT uses 2).
    relative_buckets: int = 32  # T5 relative position buckets (>= 4).
    relative_max_distance: int = 128  # T5: distances beyond this share the last bucket.
    n_decoder_layers: int = 0  # T5 decoder depth; 0: n_layers.
    scale_attention: bool = True  # Divide attention logits by sqrt(head_dim); T5 does not.
    # Recompute in the backward pass what a block does not keep: "none" keeps everything,
    # "dots" keeps the matmul outputs only, "full" keeps only the block inputs. Same parameters
    # and the same function; less memory for more compute.
    remat: str = "none"
    # Run the blocks of a stack as one lax.scan (one layer compiled, whatever the depth) instead
    # of unrolled; the same function (see `apply_blocks`, `stack_blocks`).
    scan_layers: bool = False

    def __post_init__(self):
        def check(key: str, ok: bool, want: str):
            if not ok:
                raise KilnError(f"model.{key}={getattr(self, key)!r} is invalid: use {want}.")

        check("position", self.position in _POSITIONS, f"one of {_POSITIONS}")
        check("norm", self.norm in _NORMS, f"one of {_NORMS}")
        check("mlp", self.mlp in _MLPS, f"one of {_MLPS}")
        heads_ok = self.n_heads > 0 and self.d_model % self.n_heads == 0
        check("n_heads", heads_ok, f"a divisor of d_model={self.d_model}")
        kv_ok = self.n_kv_heads > 0 and heads_ok and self.n_heads % self.n_kv_heads == 0
        check("n_kv_heads", kv_ok, f"a divisor of n_heads={self.n_heads}")
        check("dropout", 0.0 <= self.dropout < 1.0, "a rate in [0, 1)")
        check("norm_position", self.norm_position in _NORM_POSITIONS, f"one of {_NORM_POSITIONS}")
        check("remat", self.remat in REMAT_POLICIES, f"one of {tuple(REMAT_POLICIES)}")
        check("type_vocab_size", self.type_vocab_size >= 0, "0 (no token types) or more")
        check("n_decoder_layers", self.n_decoder_layers >= 0, "0 (same as n_layers) or more")
        # T5 bucketing: per direction (half the buckets when bidirectional), exact buckets for
        # small distances then log-spaced ones up to relative_max_distance, which must be larger.
        check("relative_buckets", self.relative_buckets >= 4, "an integer >= 4")
        max_exact = self.relative_buckets // 2
        check(
            "relative_max_distance",
            self.relative_max_distance > max_exact,
            f"an integer > relative_buckets // 2 = {max_exact}",
        )
        if self.position == "rope":
            check("n_heads", self.head_dim % 2 == 0, "one that makes head_dim even for rope")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def _init(std: float, names: tuple[str, ...]) -> nn.initializers.Initializer:
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def matmul(x: jax.Array, kernel: jax.Array, n_in: int = 1) -> jax.Array:
    """x . kernel contracting x's last `n_in` axes with kernel's first `n_in`, as one 2-D
    matmul [rows, in] x [in, out]: XLA's CPU backend runs the 2-D form (and its gradients)
    up to 1.7x faster than the same dot_general on [B, L, ...] operands."""
    batch_shape, out_shape = x.shape[: x.ndim - n_in], kernel.shape[n_in:]
    x_2d = x.reshape(math.prod(batch_shape), -1)
    y_2d = jnp.dot(x_2d, kernel.reshape(x_2d.shape[1], -1))
    return y_2d.reshape(*batch_shape, *out_shape)


class Dense(nn.Module):
    """y = x . kernel (+ bias), contracting the last `n_in` axes of x; kernel = in + out dims.

    The kernel is created with its full multi-dimensional shape, so its logical axis names
    (`names`, one per kernel dimension) hold from initialisation on.
    """

    features: tuple[int, ...]
    names: tuple[str, ...]
    n_in: int = 1
    std: float = 0.02
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[x.ndim - self.n_in :]
        kernel = self.param(
            "kernel", _init(self.std, self.names), (*in_shape, *self.features), self.param_dtype
        )
        y = matmul(x.astype(self.dtype), kernel.astype(self.dtype), self.n_in)
        if self.use_bias:
            bias_names = self.names[self.n_in :]
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), bias_names),
                self.features,
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y

    def transposed_kernel(self) -> jax.Array:
        """The [D, V] kernel of an output projection as a [V, D] table, in the compute dtype
        (for `HeadInputs`; the module must have been called once, e.g. by `init`)."""
        return nn.unbox(self.get_variable("params", "kernel")).T.astype(self.dtype)


def _dense(
    cfg: TransformerConfig,
    features: int | tuple[int, ...],
    axis: int | tuple[int, ...],
    names: tuple[str, ...],
    std: float,
    name: str,
) -> Dense:
    """A Dense over the trailing input axes (`axis` = -1 or (-2, -1)) with named kernel axes."""
    features = (features,) if isinstance(features, int) else tuple(features)
    n_in = 1 if isinstance(axis, int) else len(axis)
    return Dense(
        features=features,
        names=names,
        n_in=n_in,
        std=std,
        use_bias=cfg.use_bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        name=name,
    )


def make_norm(cfg: TransformerConfig, name: str) -> nn.Module:
    """LayerNorm or RMSNorm over the last axis, as configured; statistics in float32."""
    scale_init = nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",))
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(
            epsilon=cfg.norm_eps,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            scale_init=scale_init,
            name=name,
        )
    return nn.LayerNorm(
        epsilon=cfg.norm_eps,
        use_bias=cfg.use_bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        scale_init=scale_init,
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


class Embed(nn.Module):
    """Embedding table `embedding` [num_embeddings, D]; `attend` gives tied output logits."""

    num_embeddings: int
    features: int
    names: tuple[str, str] = ("vocab", "embed")
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding",
            _init(0.02, self.names),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, ids_BL: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, ids_BL, axis=0).astype(self.dtype)

    def table(self) -> jax.Array:
        """The table [num_embeddings, D] in the compute dtype."""
        return self.embedding.astype(self.dtype)

    def attend(self, x_BLD: jax.Array) -> jax.Array:
        """Float32 logits x @ embedding.T."""
        x_ND = x_BLD.astype(self.dtype).reshape(-1, x_BLD.shape[-1])
        # Without this constraint XLA's SPMD partitioner produced wrong gradients for BERT's
        # head at its masked positions on a (2, 2, 2) data x fsdp x tensor mesh (test_train.py).
        x_ND = nn.with_logical_constraint(x_ND, ("act_batch", "act_embed"))
        table_VD = self.embedding.astype(self.dtype)
        logits_NV = jnp.einsum("nd,vd->nv", x_ND, table_VD, preferred_element_type=jnp.float32)
        return logits_NV.reshape(*x_BLD.shape[:-1], -1)


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


def mask_to_bias(mask: jax.Array) -> jax.Array:
    """Boolean mask -> additive float32 bias: 0 where allowed, NEG_INF where masked."""
    return jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)


class Mlp(nn.Module):
    """Feed-forward block: GELU/ReLU, or gated SwiGLU/GeGLU (gate `wi_0`, linear `wi_1`)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x_BLD: jax.Array, *, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        std_out = 0.02 / math.sqrt(2 * cfg.n_layers)
        act = {"gelu": nn.gelu, "geglu": nn.gelu, "relu": nn.relu, "swiglu": nn.silu}[cfg.mlp]
        if cfg.mlp in ("swiglu", "geglu"):
            gate_BLF = _dense(cfg, cfg.d_ff, -1, ("embed", "mlp"), 0.02, "wi_0")(x_BLD)
            up_BLF = _dense(cfg, cfg.d_ff, -1, ("embed", "mlp"), 0.02, "wi_1")(x_BLD)
            h_BLF = act(gate_BLF) * up_BLF
        else:
            h_BLF = act(_dense(cfg, cfg.d_ff, -1, ("embed", "mlp"), 0.02, "wi")(x_BLD))
        h_BLF = nn.Dropout(cfg.dropout)(h_BLF, deterministic=deterministic)
        return _dense(cfg, cfg.d_model, -1, ("mlp", "embed"), std_out, "wo")(h_BLF)


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
        causal: bool = False,
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
            `bias` must cover [B, H, L, S_max] (see `CacheSlots`, `cached_causal_mask`). The
            call that creates the cache sets S_max = L and attends over this call's keys only.
          cache_index: int32 scalar, the first slot this call writes; required when decoding.
          static_kv: with decode, for cross-attention: the call that creates the cache stores
            the keys/values of xkv as `cross_key` / `cross_value` [B, S, K, E]; later calls read
            them and ignore xkv (the encoder output does not change while decoding).
          causal: `bias` masks every key after its query (causal self-attention over L = S),
            so key blocks wholly in the future are skipped (`causal_blocks`).

        Returns:
          Output [B, L, D] in the compute dtype.
        """
        cfg = self.config
        h, k, e = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        std_out = 0.02 / math.sqrt(2 * cfg.n_layers)
        q_BLHE = _dense(cfg, (h, e), -1, ("embed", "heads", "head_dim"), 0.02, "query")(xq_BLD)
        if decode and static_kv and self.has_variable("cache", "cross_key"):
            k_BSKE = self.get_variable("cache", "cross_key")
            v_BSKE = self.get_variable("cache", "cross_value")
        else:
            kv_names = ("embed", "kv_heads", "head_dim")
            k_BSKE = _dense(cfg, (k, e), -1, kv_names, 0.02, "key")(xkv_BSD)
            v_BSKE = _dense(cfg, (k, e), -1, kv_names, 0.02, "value")(xkv_BSD)
            if decode and static_kv:
                self.put_variable("cache", "cross_key", k_BSKE)
                self.put_variable("cache", "cross_value", v_BSKE)
        if q_positions_BL is not None:
            q_BLHE = apply_rope(q_BLHE, q_positions_BL, cfg.rope_theta)
            kv_pos_BS = q_positions_BL if kv_positions_BS is None else kv_positions_BS
            k_BSKE = apply_rope(k_BSKE, kv_pos_BS, cfg.rope_theta)
        if decode and not static_kv:
            k_BSKE, v_BSKE = self._cached_kv(k_BSKE, v_BSKE, cache_index)

        scale = 1 / math.sqrt(e) if cfg.scale_attention else 1.0
        dropout_active = cfg.dropout > 0 and not deterministic
        if use_dot_product_attention() and not dropout_active:
            out_BLHE = jax.nn.dot_product_attention(
                q_BLHE.astype(cfg.dtype),
                k_BSKE.astype(cfg.dtype),
                v_BSKE.astype(cfg.dtype),
                bias=None if bias is None else bias.astype(cfg.dtype),
                scale=scale,
            )
        else:
            dropout = nn.Dropout(cfg.dropout)
            out_BLHE = _blockwise_attention(
                q_BLHE * jnp.asarray(scale, q_BLHE.dtype),
                k_BSKE,
                v_BSKE,
                bias,
                causal_blocks(q_BLHE.shape[1], k_BSKE.shape[1]) if causal else 1,
                lambda p: dropout(p, deterministic=deterministic),
                cfg.dtype,
            )
        return _dense(cfg, cfg.d_model, (-2, -1), ("heads", "head_dim", "embed"), std_out, "out")(
            out_BLHE
        )

    def _cached_kv(
        self, k_BLKE: jax.Array, v_BLKE: jax.Array, index: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """Writes this call's keys/values into the cache; returns all slots [B, S_max, K, E]."""
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


def use_dot_product_attention() -> bool:
    """Whether attention goes through `jax.nn.dot_product_attention` (cuDNN's fused kernel
    where it applies, else XLA's): on GPUs. Elsewhere kiln's own blockwise attention, faster
    on CPUs (benchmarks/RESULTS.md); both compute the same function."""
    return jax.default_backend() == "gpu"


def causal_blocks(length: int, kv_length: int) -> int:
    """Query blocks for causal attention: up to 8 blocks of at least 64 queries, so that the
    strictly-future key blocks (up to 7/16 of the scores) are never computed; 1 when the
    lengths differ (decoding) or the sequence is short."""
    if length != kv_length:
        return 1
    return next((n for n in (8, 4, 2) if length % n == 0 and length // n >= 64), 1)


def _slice_bias(bias: jax.Array | None, queries: slice, keys: int) -> jax.Array | None:
    """bias [..., L or 1, S or 1] restricted to the query rows `queries` and the first `keys`."""
    if bias is None:
        return None
    if bias.shape[-2] > 1:
        bias = bias[..., queries, :]
    return bias[..., :keys] if bias.shape[-1] > 1 else bias


def _blockwise_attention(
    q_BLHE: jax.Array,
    k_BSKE: jax.Array,
    v_BSKE: jax.Array,
    bias: jax.Array | None,
    blocks: int,
    dropout: Any,
    dtype: Dtype,
) -> jax.Array:
    """softmax(q k^T + bias) v with grouped kv heads; q already scaled. With `blocks` > 1
    (causal only), query block i attends to the keys of blocks 0..i only."""
    b, length, h, e = q_BLHE.shape
    k = k_BSKE.shape[2]
    g = h // k
    size = length // blocks
    # Batched matmuls over one leading axis (B * K): XLA's CPU backend runs these (and their
    # gradients) ~1.5x faster than the same einsum over [B, K, G, L, S].
    k_NSE = jnp.swapaxes(k_BSKE, 1, 2).reshape(b * k, -1, e)
    v_NSE = jnp.swapaxes(v_BSKE, 1, 2).reshape(b * k, -1, e).astype(dtype)
    outs = []
    for i in range(blocks):
        rows = slice(i * size, (i + 1) * size) if blocks > 1 else slice(None)
        keys = (i + 1) * size if blocks > 1 else k_BSKE.shape[1]
        # Query head n uses kv head n // G: [B, L, K, G, E] -> [B * K, G * L, E].
        q_BLKGE = q_BLHE[:, rows].reshape(b, -1, k, g, e)
        n_queries = q_BLKGE.shape[1]
        q_NQE = jnp.transpose(q_BLKGE, (0, 2, 3, 1, 4)).reshape(b * k, g * n_queries, e)
        # Logits and softmax in float32: in bf16 the exp overflows sooner and the row sums
        # lose precision (8 mantissa bits), which biases the attention weights.
        logits_NQS = jnp.einsum(
            "nqe,nse->nqs", q_NQE, k_NSE[:, :keys], preferred_element_type=jnp.float32
        )
        logits_BHLS = logits_NQS.reshape(b, h, n_queries, keys)
        block_bias = _slice_bias(bias, rows, keys)
        if block_bias is not None:
            logits_BHLS = logits_BHLS + block_bias.astype(jnp.float32)
        probs_BHLS = dropout(jax.nn.softmax(logits_BHLS, axis=-1))
        probs_NQS = probs_BHLS.reshape(b * k, g * n_queries, keys).astype(dtype)
        out_NQE = jnp.einsum("nqs,nse->nqe", probs_NQS, v_NSE[:, :keys])
        out_BKGLE = out_NQE.reshape(b, k, g, n_queries, e)
        outs.append(jnp.transpose(out_BKGLE, (0, 3, 1, 2, 4)).reshape(b, n_queries, h, e))
    return outs[0] if blocks == 1 else jnp.concatenate(outs, axis=1)


def rematerialized(block: type[nn.Module], cfg: TransformerConfig, static: tuple[int, ...]):
    """`block` under `cfg.remat` (itself for "none"); `static` are the positions of the
    Python-valued arguments of its __call__, self being 0, and callers must pass every
    argument up to the last of them positionally. Parameter names are unchanged."""
    if cfg.remat == "none":
        return block
    return nn.remat(block, policy=REMAT_POLICIES[cfg.remat], static_argnums=static)


STACKED = "blocks"  # Under scan_layers, a stack's parameters held layer-major in one entry.


def _is_block(key: Any) -> bool:
    return isinstance(key, str) and key.startswith("block_") and key[6:].isdigit()


def _stack_leaves(*leaves: Any) -> Any:
    first = leaves[0]
    if isinstance(first, nn.Partitioned):
        value = _stack_leaves(*(leaf.value for leaf in leaves))
        return first.replace(value=value, names=(None, *first.names))
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype)
    if isinstance(first, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec(None, *first.spec))
    return jnp.stack(leaves)


def _layer_of(leaf: Any, i: int) -> Any:
    if isinstance(leaf, nn.Partitioned):
        return leaf.replace(value=_layer_of(leaf.value, i), names=leaf.names[1:])
    if isinstance(leaf, jax.ShapeDtypeStruct):
        sharding = leaf.sharding and _layer_of(leaf.sharding, i)
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)
    if isinstance(leaf, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(leaf.mesh, jax.sharding.PartitionSpec(*leaf.spec[1:]))
    return leaf[i]


def _is_leaf(x: Any) -> bool:
    return isinstance(x, nn.Partitioned | jax.ShapeDtypeStruct | jax.sharding.Sharding)


def _map_dicts(fn: Any, tree: Any) -> Any:
    """`fn` applied to every dict of `tree`, innermost first, through tuples, NamedTuples
    (optax states) and lists; other leaves unchanged."""
    if isinstance(tree, dict):
        return fn({k: _map_dicts(fn, v) for k, v in tree.items()})
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_map_dicts(fn, x) for x in tree))
    if isinstance(tree, list | tuple):
        return type(tree)(_map_dicts(fn, x) for x in tree)
    return tree


def _stack_dict(tree: dict) -> dict:
    out = {k: v for k, v in tree.items() if not _is_block(k)}
    blocks = [tree[f"block_{i}"] for i in range(sum(map(_is_block, tree)))]
    if blocks:
        out[STACKED] = jax.tree.map(_stack_leaves, *blocks, is_leaf=_is_leaf)
    return out


def _unstack_dict(tree: dict) -> dict:
    out = {k: v for k, v in tree.items() if k != STACKED}
    if STACKED in tree:
        first = jax.tree.leaves(tree[STACKED], is_leaf=_is_leaf)[0]
        count = (first.value if isinstance(first, nn.Partitioned) else first).shape[0]
        for i in range(count):
            layer_i = functools.partial(_layer_of, i=i)
            out[f"block_{i}"] = jax.tree.map(layer_i, tree[STACKED], is_leaf=_is_leaf)
    return out


def stack_blocks(tree: Any) -> Any:
    """`tree` with every dict's block_0 .. block_{n-1} replaced by one `STACKED` entry whose
    leaves stack theirs on a new leading axis (unsharded, unnamed). Works on parameters,
    optimizer states, abstract shapes, boxes and shardings."""
    return _map_dicts(_stack_dict, tree)


def unstack_blocks(tree: Any) -> Any:
    """The inverse of `stack_blocks`: per-layer block_i entries again (a no-op on trees that
    hold none stacked)."""
    return _map_dicts(_unstack_dict, tree)


def apply_blocks(
    parent: nn.Module,
    blocks: Sequence[nn.Module],
    x: jax.Array,
    args: tuple,
    *,
    scan: bool,
    dropout_rng: bool,
) -> jax.Array:
    """`x` through `blocks` (children of `parent`, one class) in order, as `block(x, *args)`.

    `scan`: one `lax.scan` over the blocks' parameters (one layer traced and compiled,
    whatever the depth). They are used as held when the train state keeps them stacked
    (`STACKED`, see `train.init_state`), else stacked inside the step.
    `dropout_rng`: dropout is active; layer i then draws its masks from key i of a split of one
    `parent` key, scanned or not, so both run the same function. Not for decoding, which needs
    per-layer parameters (`unstack_blocks`).
    """
    if parent.is_initializing():
        for block in blocks:
            x = block(x, *args)
        return x
    params = nn.meta.unbox(parent.variables["params"])
    if STACKED in params and not scan:
        raise KilnError(
            f"{parent.name or type(parent).__name__}: its blocks' parameters are stacked (held"
            " for model.scan_layers); unstack them (kiln.models.layers.unstack_blocks) to run"
            " the blocks one by one, as decoding does."
        )
    if not (scan or dropout_rng):
        for block in blocks:
            x = block(x, *args)
        return x
    keys = jax.random.split(parent.make_rng("dropout"), len(blocks)) if dropout_rng else None
    layer = blocks[0].clone(parent=None, name=None)

    def apply_layer(x, params_and_key):
        layer_params, key = params_and_key
        rngs = {} if key is None else {"dropout": key}
        return layer.apply({"params": layer_params}, x, *args, rngs=rngs), None

    if scan:
        if STACKED not in params:  # Per-layer parameters (not from a train state): stack here.
            params = _stack_dict(params)
        return jax.lax.scan(apply_layer, x, (params[STACKED], keys))[0]
    for i, block in enumerate(blocks):
        x, _ = apply_layer(x, (params[block.name], None if keys is None else keys[i]))
    return x


# Positions of TransformerBlock.__call__'s Python-valued arguments (deterministic, decode,
# causal), self being 0.
BLOCK_STATIC_ARGS = (4, 5, 7)


class TransformerBlock(nn.Module):
    """Self-attention then MLP, each a residual branch; pre-LN or post-LN per the config.

    pre: x + f(norm(x)) (norms `pre_attn_norm`, `pre_mlp_norm`); post: norm(x + f(x)) (norms
    `post_attn_norm`, `post_mlp_norm`), so a checkpoint's tree tells which order it was trained in.
    """

    config: TransformerConfig

    @nn.compact
    def __call__(
        self,
        x_BLD: jax.Array,
        bias: jax.Array,
        positions_BL: jax.Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
        cache_index: jax.Array | None = None,
        causal: bool = False,
    ) -> jax.Array:
        """Returns the block's output [B, L, D]. Pass every argument, positionally: under
        `remat` keyword arguments would be traced (see `rematerialized`).

        Args:
          x_BLD: inputs.
          bias: additive float32 attention bias broadcastable to [B, H, L, L] (see `Attention`);
            [B, H, L, S_max] over the cache slots when decoding.
          positions_BL: if given, rope is applied with these positions.
          deterministic: disables dropout.
          decode: self-attention reads and extends the KV cache (see `Attention`).
          cache_index: int32 scalar, the first cache slot of this call when decoding.
          causal: the bias is causal (see `Attention`).
        """
        cfg = self.config
        pre = cfg.norm_position == "pre"

        def norm(x_BLD, sublayer):
            return make_norm(cfg, f"{cfg.norm_position}_{sublayer}_norm")(x_BLD)

        def dropout(h_BLD):
            return nn.Dropout(cfg.dropout)(h_BLD, deterministic=deterministic)

        x_BLD = nn.with_logical_constraint(x_BLD, ACT_NAMES)
        h_BLD = norm(x_BLD, "attn") if pre else x_BLD
        h_BLD = Attention(cfg, name="attn")(
            h_BLD,
            h_BLD,
            bias,
            positions_BL,
            positions_BL,
            deterministic=deterministic,
            decode=decode,
            cache_index=cache_index,
            causal=causal,
        )
        x_BLD = x_BLD + dropout(h_BLD)
        x_BLD = x_BLD if pre else norm(x_BLD, "attn")
        h_BLD = norm(x_BLD, "mlp") if pre else x_BLD
        h_BLD = Mlp(cfg, name="mlp")(h_BLD, deterministic=deterministic)
        x_BLD = x_BLD + dropout(h_BLD)
        x_BLD = x_BLD if pre else norm(x_BLD, "mlp")
        return nn.with_logical_constraint(x_BLD, ACT_NAMES)
