"""GPT: a decoder-only transformer over packed documents, causal or prefix LM.

GPT-2 style: learned positions, layernorm, gelu, biases, tied embeddings. Modern style: rope,
rmsnorm, swiglu, no biases, GQA, optionally an untied head. Blocks are pre-LN unless
`norm_position="post"` (GPT-1), which also drops the final norm.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from kiln.models import layers
from kiln.models.layers import TransformerConfig


class GPT(nn.Module):
    """Causal (or prefix) language model; attention never crosses document boundaries."""

    config: TransformerConfig

    @nn.compact
    def __call__(
        self,
        inputs: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        prefix_mask: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        """Returns float32 next-token logits [B, L, V].

        Argument names match the batch keys of the decoder objectives (`kiln.data.objectives`).

        Args:
          inputs: token ids [B, L].
          segment_ids: document ids [B, L], 0 for padding; None means one document per row.
          positions: position of each token in its document [B, L]; None means arange(L).
          prefix_mask: 1 for tokens of the bidirectional prefix of their document [B, L] (prefix
            LM); None means causal everywhere.
          deterministic: disables dropout; otherwise the "dropout" rng collection is used.
        """
        cfg = self.config
        tokens_BL, segment_ids_BL, positions_BL = inputs, segment_ids, positions
        segment_ids_BL, positions_BL = layers.segments_and_positions(
            tokens_BL.shape, segment_ids_BL, positions_BL
        )
        if prefix_mask is None:
            mask_B1LL = layers.causal_mask(segment_ids_BL)
        else:
            mask_B1LL = layers.prefix_lm_mask(segment_ids_BL, prefix_mask)
        bias_B1LL = layers.mask_to_bias(mask_B1LL)

        kw = dict(features=cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        embed = layers.Embed(cfg.vocab_size, names=("vocab", "embed"), name="token_embed", **kw)
        x_BLD = embed(tokens_BL)
        if cfg.position == "learned":
            pos_embed = layers.Embed(
                cfg.max_len, names=("max_len", "embed"), name="position_embed", **kw
            )
            x_BLD = x_BLD + pos_embed(positions_BL)
        x_BLD = nn.Dropout(cfg.dropout)(x_BLD, deterministic=deterministic)

        rope_positions_BL = positions_BL if cfg.position == "rope" else None
        for i in range(cfg.n_layers):
            x_BLD = layers.TransformerBlock(cfg, name=f"block_{i}")(
                x_BLD, bias_B1LL, rope_positions_BL, deterministic=deterministic
            )
        if cfg.norm_position == "pre":  # Post-LN blocks already end in a norm.
            x_BLD = layers.make_norm(cfg, "final_norm")(x_BLD)
        x_BLD = nn.with_logical_constraint(x_BLD, layers.ACT_NAMES)

        if cfg.tie_embeddings:
            logits_BLV = embed.attend(x_BLD)
        else:
            logits_BLV = layers.Dense(
                (cfg.vocab_size,),
                ("embed", "vocab"),
                use_bias=False,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                name="lm_head",
            )(x_BLD)
        logits_BLV = logits_BLV.astype(jnp.float32)
        return nn.with_logical_constraint(logits_BLV, ("act_batch", "act_length", "act_vocab"))


def count_params(params) -> int:
    """Number of parameters in a tree of arrays, shape structs or `nn.Partitioned` boxes."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(params)))
