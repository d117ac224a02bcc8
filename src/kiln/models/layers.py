"""Transformer primitives shared by the GPT, BERT and T5 families: the config, dense layers
(with optional LoRA adapters), norms, embeddings and the MLP. Masks and rope are in `masks.py`
(re-exported here), attention in `attention.py`, the block and the layer stack in `blocks.py`.

Shape suffixes: B batch, L length (queries), S length (keys/values), D d_model, H heads,
K kv heads, G query groups (H // K), E head_dim, F d_ff, V vocab.
"""

import dataclasses
import functools
import math
import re
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kiln.errors import config_error
from kiln.models.masks import NEG_INF as NEG_INF  # Re-exported: the families read them here.
from kiln.models.masks import apply_rope as apply_rope
from kiln.models.masks import cached_causal_mask as cached_causal_mask
from kiln.models.masks import causal_mask as causal_mask
from kiln.models.masks import mask_to_bias as mask_to_bias
from kiln.models.masks import padding_mask as padding_mask
from kiln.models.masks import prefix_lm_mask as prefix_lm_mask
from kiln.models.masks import segments_and_positions as segments_and_positions

Dtype = jnp.dtype | str

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
}
# The one list of the choices of each `model` field that has choices (the default first).
MODEL_CHOICES = {
    "position": ("learned", "rope", "none"),
    "norm": ("layernorm", "rmsnorm"),
    "norm_position": ("pre", "post"),
    "mlp": ("gelu", "relu", "swiglu", "geglu"),
    "dtype": ("float32", "bfloat16", "float16"),
    "param_dtype": ("float32", "bfloat16"),
    "remat": tuple(REMAT_POLICIES),
}
_POSITIVE = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_len")

# Layer-config fields set from the run's `finetune` section (`kiln.peft`), not from `model`.
PEFT_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "prompt_length")
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
    # GELU (mlp gelu/geglu, BERT's MLM head) as tanh approximation (GPT-2's and T5 v1.1's
    # "gelu_new"); False: the exact erf form (HF BERT's "gelu").
    gelu_approximate: bool = True
    use_bias: bool = True  # Biases of dense layers and of layernorm.
    tie_embeddings: bool = True
    dropout: float = 0.0
    # Std of the dense kernels at initialisation (output projections: / sqrt(2 * n_layers));
    # embeddings start at 0.02 whatever it is. 0.02 is BERT's and GPT-2's (tuned at d=768);
    # about d_model ** -0.5 (fan-in scaling) trains small models much faster from scratch.
    init_std: float = 0.02
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
    # Attention head size (T5's d_kv): q/k/v project d_model -> n_heads * head_dim and the
    # output back. 0 = d_model // n_heads. Read back, `cfg.head_dim` is always the size used.
    head_dim: int = 0
    # Recompute in the backward pass what a block does not keep: "none" keeps everything,
    # "dots" keeps the matmul outputs only, "full" keeps only the block inputs. Same parameters
    # and the same function; less memory for more compute.
    remat: str = "none"
    # Run the blocks of a stack as one lax.scan (one layer compiled, whatever the depth) instead
    # of unrolled; the same function (see `blocks.apply_blocks`, `blocks.stack_blocks`).
    scan_layers: bool = False
    # `PEFT_FIELDS`: LoRA adapters on the `make_dense` kernels whose path matches lora_targets
    # (see `Dense`; rank 0 = none), a soft prompt of prompt_length vectors (`adapters`).
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = ""
    prompt_length: int = 0

    def __post_init__(self):
        # The model section's rules live here only: `validation.validate` builds this config.
        _check_sizes(self)
        _check_values(self)
        if not self.head_dim_given:
            object.__setattr__(self, "head_dim", _DerivedHeadDim(self.d_model // self.n_heads))

    @property
    def head_dim_given(self) -> bool:
        """Whether `head_dim` was set (else it is d_model // n_heads)."""
        return bool(self.head_dim) and not isinstance(self.head_dim, _DerivedHeadDim)


class _DerivedHeadDim(int):
    """A `head_dim` filled in as d_model // n_heads. `dataclasses.replace` passes it back to
    the new config, which derives it again from its own d_model and n_heads."""


def _fail(key: str, value: object, why: str, fix: str) -> None:
    raise config_error(f"model.{key}", value, why, fix)


def _check_sizes(cfg: TransformerConfig) -> None:
    """The rules of the model's choices and sizes."""
    for key, choices in MODEL_CHOICES.items():
        if getattr(cfg, key) not in choices:
            _fail(key, getattr(cfg, key), "is not supported", f"Use one of {list(choices)}.")
    for key in _POSITIVE:
        if getattr(cfg, key) <= 0:
            _fail(key, getattr(cfg, key), "must be positive", "Set a value above 0.")
    if cfg.head_dim < 0:
        _fail("head_dim", cfg.head_dim, "is negative", "Use 0 (d_model // n_heads) or more.")
    if not cfg.head_dim_given and cfg.d_model % cfg.n_heads:
        why = f"is not divisible by model.n_heads={cfg.n_heads}"
        fix = "Pick d_model = n_heads * head_dim, or set model.head_dim."
        _fail("d_model", cfg.d_model, why, fix)
    if cfg.n_heads % cfg.n_kv_heads:
        _fail(
            "n_kv_heads",
            cfg.n_kv_heads,
            f"does not divide model.n_heads={cfg.n_heads}",
            "Grouped-query attention needs n_heads to be a multiple of n_kv_heads.",
        )
    size = cfg.head_dim if cfg.head_dim_given else cfg.d_model // cfg.n_heads
    if cfg.position == "rope" and size % 2:
        key, why = ("head_dim", "is odd") if cfg.head_dim_given else ("n_heads", "gives an odd")
        why += " head size, which RoPE cannot rotate"
        _fail(key, getattr(cfg, key), why, "Choose an even head_dim (d_model / n_heads if 0).")


def _check_values(cfg: TransformerConfig) -> None:
    """The rules of the model's rates and family-specific sizes."""
    if not 0.0 <= cfg.dropout < 1.0:
        _fail("dropout", cfg.dropout, "must be in [0, 1)", "Use e.g. 0.1, or 0.0 for none.")
    if not 0.0 < cfg.init_std < 1.0:
        _fail("init_std", cfg.init_std, "must be in (0, 1)", "Use 0.02, or d_model ** -0.5.")
    if cfg.type_vocab_size < 0:
        _fail("type_vocab_size", cfg.type_vocab_size, "is negative", "Use 0 (none) or more.")
    if cfg.n_decoder_layers < 0:
        why, fix = "is negative", "Use 0 (as many as model.n_layers) or more."
        _fail("n_decoder_layers", cfg.n_decoder_layers, why, fix)
    # T5 bucketing: per direction (half the buckets when bidirectional), exact buckets for
    # small distances then log-spaced ones up to relative_max_distance, which must be larger.
    if cfg.relative_buckets < 4:
        _fail("relative_buckets", cfg.relative_buckets, "is below 4", "Use 4 or more (T5: 32).")
    max_exact = cfg.relative_buckets // 2
    if cfg.relative_max_distance <= max_exact:
        _fail(
            "relative_max_distance",
            cfg.relative_max_distance,
            f"is not above model.relative_buckets // 2 = {max_exact}",
            f"Use more than {max_exact} (T5: 128).",
        )


def check_fixed_fields(
    cfg: TransformerConfig, family: str, fixed: tuple[tuple[str, object], ...]
) -> None:
    """Raises unless `cfg` has each (field, value) of `fixed`, the values `family` is built for
    (e.g. T5 has no absolute positions); its model's `setup` and `validation.validate` call it."""
    for key, want in fixed:
        if getattr(cfg, key) != want:
            why = f"is not supported by model.family={family!r}"
            _fail(key, getattr(cfg, key), why, f"Use {want!r} (or another model.family).")


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

    LoRA (`lora_rank` > 0): at init, a kernel whose path ("block_0/attn/query/kernel") fully
    matches `lora_targets` gets adapters `lora_a` [in..., r] (normal, std 1/sqrt(fan_in)) and
    `lora_b` [r, out...] (zeros, so the adapted model starts as the base), and then
    y += (lora_alpha / r) * dropout(x) . lora_a . lora_b. They carry the kernel's logical names
    on their in and out axes (the rank axis is replicated). Applied, a Dense uses adapters iff
    its parameters hold them; the dropout is active when a "dropout" rng is given (training).
    """

    features: tuple[int, ...]
    names: tuple[str, ...]
    std: float  # Of the normal the kernel starts from: `TransformerConfig.init_std` (or scaled).
    n_in: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = ""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[x.ndim - self.n_in :]
        kernel = self.param(
            "kernel", _init(self.std, self.names), (*in_shape, *self.features), self.param_dtype
        )
        y = matmul(x.astype(self.dtype), kernel.astype(self.dtype), self.n_in)
        if self._has_lora(in_shape):
            y = y + self._lora(x, in_shape)
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

    def _has_lora(self, in_shape: tuple[int, ...]) -> bool:
        if not self.lora_rank:
            return False
        if not self.is_initializing():
            return self.has_variable("params", "lora_a")
        path = "/".join((*self.path, "kernel"))
        if not re.fullmatch(self.lora_targets, path):
            return False
        dims = (math.prod(in_shape), math.prod(self.features))
        if self.lora_rank > min(dims):
            why = f"exceeds the smaller dimension of {path} ({dims[0]} x {dims[1]})"
            raise config_error(
                "finetune.lora.rank", self.lora_rank, why, f"Use a rank <= {min(dims)}."
            )
        return True

    def _lora(self, x: jax.Array, in_shape: tuple[int, ...]) -> jax.Array:
        """(alpha / r) * dropout(x) . lora_a . lora_b."""
        r, fan_in = self.lora_rank, math.prod(in_shape)
        a_names, b_names = (*self.names[: self.n_in], None), (None, *self.names[self.n_in :])
        lora_a = self.param(
            "lora_a", _init(fan_in**-0.5, a_names), (*in_shape, r), self.param_dtype
        )
        zeros = nn.with_logical_partitioning(nn.initializers.zeros_init(), b_names)
        lora_b = self.param("lora_b", zeros, (r, *self.features), self.param_dtype)
        x = nn.Dropout(self.lora_dropout)(x, deterministic=not self.has_rng("dropout"))
        h = matmul(x.astype(self.dtype), lora_a.astype(self.dtype), self.n_in)
        return (self.lora_alpha / r) * matmul(h, lora_b.astype(self.dtype), 1)

    def transposed_kernel(self) -> jax.Array:
        """The [D, V] kernel of an output projection as a [V, D] table, in the compute dtype
        (for `HeadInputs`; the module must have been called once, e.g. by `init`)."""
        return nn.unbox(self.get_variable("params", "kernel")).T.astype(self.dtype)


def make_dense(
    cfg: TransformerConfig,
    features: int | tuple[int, ...],
    axis: int | tuple[int, ...],
    names: tuple[str, ...],
    std: float,
    name: str,
) -> Dense:
    """A Dense named `name` over the trailing input axes (`axis` = -1 or (-2, -1)), with the
    config's bias, dtypes and LoRA settings and the logical axis names `names` on its kernel."""
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
        lora_rank=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        lora_targets=cfg.lora_targets,
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


def gelu(cfg: TransformerConfig) -> Callable[[jax.Array], jax.Array]:
    """GELU, tanh-approximate or exact (erf) as `cfg.gelu_approximate` says."""
    return functools.partial(nn.gelu, approximate=cfg.gelu_approximate)


class Mlp(nn.Module):
    """Feed-forward block: GELU/ReLU, or gated SwiGLU/GeGLU (gate `wi_0`, linear `wi_1`)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x_BLD: jax.Array, *, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        std_out = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        act = {"gelu": gelu(cfg), "geglu": gelu(cfg), "relu": nn.relu, "swiglu": nn.silu}[cfg.mlp]
        if cfg.mlp in ("swiglu", "geglu"):
            gate_BLF = make_dense(cfg, cfg.d_ff, -1, ("embed", "mlp"), cfg.init_std, "wi_0")(x_BLD)
            up_BLF = make_dense(cfg, cfg.d_ff, -1, ("embed", "mlp"), cfg.init_std, "wi_1")(x_BLD)
            h_BLF = act(gate_BLF) * up_BLF
        else:
            h_BLF = act(make_dense(cfg, cfg.d_ff, -1, ("embed", "mlp"), cfg.init_std, "wi")(x_BLD))
        h_BLF = nn.Dropout(cfg.dropout)(h_BLF, deterministic=deterministic)
        return make_dense(cfg, cfg.d_model, -1, ("mlp", "embed"), std_out, "wo")(h_BLF)
