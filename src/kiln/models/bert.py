"""BERT: a bidirectional encoder with a masked-LM head over packed documents.

Classic BERT: `norm_position="post"`, learned positions, layernorm after the embedding sum,
`type_vocab_size=2`. Pre-LN (the default) instead ends in a final norm. Task heads subclass
`BERT` (adding their modules in `setup`) and call `encode`; their tree then matches the
pre-trained one except for `mlm_head`, which `init_from` skips with the regex `mlm_head/.*`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from kiln.models import adapters, blocks, layers
from kiln.models.layers import TransformerConfig


class MlmHead(nn.Module):
    """dense + gelu + norm, then logits tied to the token embedding, plus a `bias` [V]."""

    config: TransformerConfig

    @nn.compact
    def __call__(
        self, x_BLD: jax.Array, token_embed: layers.Embed, head_inputs: bool = False
    ) -> jax.Array | layers.HeadInputs:
        cfg = self.config
        # A logical name may occur once per array; the output axis shards like an MLP's.
        h_BLD = layers.Dense(
            (cfg.d_model,),
            ("embed", "mlp"),
            use_bias=cfg.use_bias,
            std=cfg.init_std,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            name="mlm_transform",
        )(x_BLD)
        h_BLD = layers.make_norm(cfg, "mlm_norm")(layers.gelu(cfg)(h_BLD))
        bias_V = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",)),
            (cfg.vocab_size,),
            cfg.param_dtype,
        )
        if head_inputs:
            return layers.HeadInputs(h_BLD, token_embed.table(), bias_V)
        return token_embed.attend(h_BLD) + bias_V.astype(jnp.float32)


class BERT(nn.Module):
    """Masked language model; attention is bidirectional within each document (segment)."""

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        kw = dict(features=cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.token_embed = layers.Embed(cfg.vocab_size, names=("vocab", "embed"), **kw)
        if cfg.position == "learned":
            self.position_embed = layers.Embed(cfg.max_len, names=("max_len", "embed"), **kw)
        if cfg.type_vocab_size > 0:
            self.type_embed = layers.Embed(cfg.type_vocab_size, names=("type_vocab", "embed"), **kw)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        if cfg.prompt_length:  # Prompt tuning (`kiln.peft`): a learned prompt goes first.
            self.soft_prompt = adapters.SoftPrompt(cfg, name=adapters.PROMPT)
        block = blocks.rematerialized(blocks.TransformerBlock, cfg)
        self.blocks = [block(cfg, name=f"block_{i}") for i in range(cfg.n_layers)]
        # Post-LN normalises the embedding sum (as BERT does); pre-LN normalises the output.
        norm_name = "embed_norm" if cfg.norm_position == "post" else "final_norm"
        self.norm = layers.make_norm(cfg, norm_name)
        self.mlm_head = MlmHead(cfg)

    def encode(
        self,
        inputs: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        """Final hidden states [B, L, D]; the arguments are those of `__call__`."""
        cfg = self.config
        tokens_BL, segment_ids_BL, positions_BL = inputs, segment_ids, positions
        segment_ids_BL, positions_BL = layers.segments_and_positions(
            tokens_BL.shape, segment_ids_BL, positions_BL
        )
        # Real tokens see their own document only; padding (segment 0) sees padding only.
        bias_B1LL = layers.mask_to_bias(layers.padding_mask(segment_ids_BL, segment_ids_BL))

        x_BLD = self.token_embed(tokens_BL)
        if cfg.position == "learned":
            x_BLD = x_BLD + self.position_embed(positions_BL)
        if cfg.type_vocab_size > 0:
            types_BL = jnp.zeros_like(tokens_BL) if token_type_ids is None else token_type_ids
            x_BLD = x_BLD + self.type_embed(types_BL)
        if cfg.norm_position == "post":
            x_BLD = self.norm(x_BLD)
        x_BLD = self.embed_dropout(x_BLD, deterministic=deterministic)

        rope_positions_BL = positions_BL if cfg.position == "rope" else None
        if cfg.prompt_length:
            x_BLD, bias_B1LL, rope_positions_BL = self.soft_prompt.prepend(
                x_BLD, bias_B1LL, rope_positions_BL
            )
        args = blocks.BlockArgs(bias=bias_B1LL, positions_BL=rope_positions_BL)
        mode = blocks.BlockMode(deterministic=deterministic)  # Bidirectional, never decoding.
        x_BLD = blocks.apply_blocks(self, self.blocks, x_BLD, args, mode)
        if cfg.prompt_length:  # [CLS] is position 0 again for the pooler.
            x_BLD = self.soft_prompt.strip(x_BLD)
        if cfg.norm_position == "pre":
            x_BLD = self.norm(x_BLD)
        return nn.with_logical_constraint(x_BLD, layers.ACT_NAMES)

    def __call__(
        self,
        inputs: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        predict_positions: jax.Array | None = None,
        *,
        deterministic: bool = True,
        head_inputs: bool = False,
    ) -> jax.Array | layers.HeadInputs:
        """Returns float32 masked-LM logits [B, L, V] at every position, or [B, C, V] at
        `predict_positions` only.

        Argument names match the batch keys of the masked-LM objective (`kiln.data.objectives`).

        Args:
          inputs: token ids [B, L], masked tokens already replaced.
          segment_ids: document ids [B, L], 0 for padding; None means one document per row.
          positions: position of each token in its document [B, L]; None means arange(L).
          token_type_ids: segment A/B ids [B, L] when `type_vocab_size` > 0 (None means all 0);
            ignored otherwise.
          predict_positions: [B, C] the positions the loss needs (the masked-LM objective's
            selected tokens, padded): the head, whose vocabulary projection dominates a small
            BERT's FLOPs, then runs on those C rows only, as in the original BERT.
          deterministic: disables dropout; otherwise the "dropout" rng collection is used.
          head_inputs: return what the logits are made of instead (`layers.HeadInputs`).
        """
        x_BLD = self.encode(
            inputs, segment_ids, positions, token_type_ids, deterministic=deterministic
        )
        if predict_positions is not None:
            x_BLD = jnp.take_along_axis(x_BLD, predict_positions[:, :, None], axis=1)
            x_BLD = nn.with_logical_constraint(x_BLD, layers.ACT_NAMES)
        if head_inputs:
            return self.mlm_head(x_BLD, self.token_embed, head_inputs=True)
        logits_BLV = self.mlm_head(x_BLD, self.token_embed).astype(jnp.float32)
        return nn.with_logical_constraint(logits_BLV, ("act_batch", "act_length", "act_vocab"))
