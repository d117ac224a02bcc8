"""GPT: a decoder-only transformer over packed documents, causal or prefix LM.

GPT-2 style: learned positions, layernorm, gelu, biases, tied embeddings. Modern style: rope,
rmsnorm, swiglu, no biases, GQA, optionally an untied head. Blocks are pre-LN unless
`norm_position="post"` (GPT-1), which also drops the final norm.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from kiln.errors import KilnError
from kiln.models import adapters, attention, blocks, layers
from kiln.models.layers import TransformerConfig


class GPT(nn.Module):
    """Causal (or prefix) language model; attention never crosses document boundaries.

    `hidden` gives the final hidden states and `__call__` the logits; task heads subclass GPT
    (see `heads.GPTClassifier`), so their parameter tree extends the pre-trained one.
    """

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        kw = dict(features=cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.token_embed = layers.Embed(cfg.vocab_size, names=("vocab", "embed"), **kw)
        if cfg.position == "learned":
            self.position_embed = layers.Embed(cfg.max_len, names=("max_len", "embed"), **kw)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        if cfg.prompt_length:  # Prompt tuning (`kiln.peft`): a learned prompt goes first.
            self.soft_prompt = adapters.SoftPrompt(cfg, name=adapters.PROMPT)
        self.cache_slots = attention.CacheSlots()  # Decode mode only (the "cache" collection).
        block = blocks.rematerialized(blocks.TransformerBlock, cfg)
        self.blocks = [block(cfg, name=f"block_{i}") for i in range(cfg.n_layers)]
        if cfg.norm_position == "pre":  # Post-LN blocks already end in a norm.
            self.final_norm = layers.make_norm(cfg, "final_norm")
        if not cfg.tie_embeddings:
            self.lm_head = layers.Dense(
                (cfg.vocab_size,),
                ("embed", "vocab"),
                use_bias=False,
                std=cfg.init_std,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
            )

    def hidden(
        self,
        inputs: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        prefix_mask: jax.Array | None = None,
        *,
        deterministic: bool = True,
        decode: bool = False,
    ) -> jax.Array:
        """Final hidden states [B, L, D]; the arguments are those of `__call__`."""
        cfg = self.config
        tokens_BL, segment_ids_BL, positions_BL = inputs, segment_ids, positions
        segment_ids_BL, positions_BL = layers.segments_and_positions(
            tokens_BL.shape, segment_ids_BL, positions_BL
        )
        cache_index = None
        if decode:
            if prefix_mask is not None:
                raise KilnError("GPT: decode=True supports causal attention only, no prefix_mask.")
            cache_index, positions_BL, kv_segment_ids_BS, _ = self.cache_slots(
                segment_ids_BL, positions
            )
            mask_B1LS = layers.cached_causal_mask(segment_ids_BL, kv_segment_ids_BS, cache_index)
        elif prefix_mask is None:
            mask_B1LS = layers.causal_mask(segment_ids_BL)
        else:
            mask_B1LS = layers.prefix_lm_mask(segment_ids_BL, prefix_mask)
        bias_B1LS = layers.mask_to_bias(mask_B1LS)

        x_BLD = self.token_embed(tokens_BL)
        if cfg.position == "learned":
            x_BLD = x_BLD + self.position_embed(positions_BL)
        x_BLD = self.embed_dropout(x_BLD, deterministic=deterministic)

        rope_positions_BL = positions_BL if cfg.position == "rope" else None
        if cfg.prompt_length:
            if decode:
                raise KilnError(
                    "GPT: a soft prompt (finetune.prompt_tuning) cannot decode with the KV cache;"
                    " fine-tune a decoder for generation with finetune.lora instead."
                )
            x_BLD, bias_B1LS, rope_positions_BL = self.soft_prompt.prepend(
                x_BLD, bias_B1LS, rope_positions_BL
            )
        args = blocks.BlockArgs(
            bias=bias_B1LS, positions_BL=rope_positions_BL, cache_index=cache_index
        )
        mode = blocks.BlockMode(deterministic=deterministic, decode=decode)
        x_BLD = blocks.apply_blocks(self, self.blocks, x_BLD, args, mode)
        if cfg.prompt_length:
            x_BLD = self.soft_prompt.strip(x_BLD)
        if cfg.norm_position == "pre":
            x_BLD = self.final_norm(x_BLD)
        return nn.with_logical_constraint(x_BLD, layers.ACT_NAMES)

    def __call__(
        self,
        inputs: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        prefix_mask: jax.Array | None = None,
        *,
        deterministic: bool = True,
        decode: bool = False,
        head_inputs: bool = False,
    ) -> jax.Array | layers.HeadInputs:
        """Returns float32 next-token logits [B, L, V].

        Argument names match the batch keys of the decoder objectives (`kiln.data.objectives`).

        Args:
          inputs: token ids [B, L].
          segment_ids: document ids [B, L], 0 for padding; None means one document per row.
          positions: position of each token in its document [B, L]; None means arange(L).
          prefix_mask: 1 for tokens of the bidirectional prefix of their document [B, L] (prefix
            LM); None means causal everywhere.
          deterministic: disables dropout; otherwise the "dropout" rng collection is used.
          decode: incremental decoding with a KV cache in the "cache" collection (apply with
            `mutable=["cache"]`): the tokens extend the cached sequence, at cache slots
            [index, index + L), and attend to every earlier slot of their segment; positions
            None then means the slot numbers. The first decode call creates the cache with
            S_max = L slots; see `kiln.decoding.init_cache`. Causal only (no prefix_mask).
          head_inputs: return what the logits are made of instead (`layers.HeadInputs`), for
            `losses.fused_cross_entropy_sums`.
        """
        x_BLD = self.hidden(
            inputs,
            segment_ids,
            positions,
            prefix_mask,
            deterministic=deterministic,
            decode=decode,
        )
        if head_inputs:
            if self.config.tie_embeddings:
                return layers.HeadInputs(x_BLD, self.token_embed.table())
            return layers.HeadInputs(x_BLD, self.lm_head.transposed_kernel())
        if self.config.tie_embeddings:
            logits_BLV = self.token_embed.attend(x_BLD)
        else:
            logits_BLV = self.lm_head(x_BLD)
        logits_BLV = logits_BLV.astype(jnp.float32)
        return nn.with_logical_constraint(logits_BLV, ("act_batch", "act_length", "act_vocab"))


def count_params(params) -> int:
    """Number of parameters in a tree of arrays, shape structs or `nn.Partitioned` boxes."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(params)))
