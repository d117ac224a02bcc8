"""T5: an encoder-decoder transformer with relative position biases (T5 v1.1 by config).

The encoder reads the corrupted input bidirectionally; the decoder predicts the targets causally
and cross-attends to the encoder output. Positions enter only through learned per-head biases of
bucketed relative positions, one table per stack shared by all its layers.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kiln.models import adapters, attention, blocks, layers
from kiln.models.layers import TransformerConfig

RELPOS_NAMES = ("relpos_buckets", "heads")
# T5 has only relative position biases, and pre-norm blocks in both stacks.
FIXED_FIELDS = (("position", "none"), ("norm_position", "pre"))


def _distance_buckets(num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of each distance 0..max_distance within one direction, as an int32 table.

    Distances below num_buckets // 2 get their own bucket; the rest are spaced logarithmically
    up to max_distance, and larger distances share the last bucket.
    """
    max_exact = num_buckets // 2
    distance = np.arange(max_distance + 1)
    log_ratio = np.log2(np.maximum(distance, 1) / max_exact) / np.log2(max_distance / max_exact)
    # On the host in float64, so the bucket edges do not depend on the backend's float32 log; the
    # epsilon keeps a distance exactly on an edge (64, with 16 buckets per direction up to 128)
    # in the upper bucket despite rounding.
    large = max_exact + np.floor(log_ratio * (num_buckets - max_exact) + 1e-9).astype(np.int64)
    buckets = np.where(distance < max_exact, distance, np.minimum(large, num_buckets - 1))
    return buckets.astype(np.int32)


def relative_position_bucket(
    relative_position: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
    """T5's bucket of each relative position (key position - query position).

    Args:
      relative_position: integer array of key position - query position.
      bidirectional: if True, keys before the query use buckets [0, num_buckets / 2) and keys
        after it [num_buckets / 2, num_buckets); if False (causal), all buckets go to keys at or
        before the query and keys after it share bucket 0.
      num_buckets: number of buckets.
      max_distance: distances from here on share the last bucket of their direction.

    Returns:
      int32 buckets in [0, num_buckets), shaped like relative_position.
    """
    relative_position = jnp.asarray(relative_position)
    if bidirectional:
        num_buckets //= 2
        offset = jnp.where(relative_position > 0, num_buckets, 0)
        distance = jnp.abs(relative_position)
    else:
        offset = 0
        distance = jnp.maximum(-relative_position, 0)
    table = jnp.asarray(_distance_buckets(num_buckets, max_distance))
    return offset + table[jnp.minimum(distance, max_distance)]


def _position_bias(
    table: layers.Embed,
    q_positions_BL: jax.Array,
    kv_positions_BS: jax.Array,
    *,
    bidirectional: bool,
    max_distance: int,
) -> jax.Array:
    """Float32 attention bias [B, H, L, S] of the relative positions kv - q."""
    relative_BLS = kv_positions_BS[:, None, :] - q_positions_BL[:, :, None]
    buckets_BLS = relative_position_bucket(
        relative_BLS, bidirectional, table.num_embeddings, max_distance
    )
    return jnp.moveaxis(table(buckets_BLS), -1, 1)


def _relpos_table(cfg: TransformerConfig) -> layers.Embed:
    """The stack's bias table [buckets, H]; looked up in float32, like the attention logits."""
    return layers.Embed(
        cfg.relative_buckets,
        cfg.n_heads,
        names=RELPOS_NAMES,
        dtype=jnp.float32,
        param_dtype=cfg.param_dtype,
        name="relpos_bias",
    )


class DecoderArgs(NamedTuple):
    """The arrays a `DecoderBlock` reads besides its input, the same for every layer."""

    encoded_BSD: jax.Array  # Encoder output, cross-attended to.
    self_bias_BHLS: jax.Array  # Causal mask + relative bias; over the cache slots if decoding.
    cross_bias_B1LS: jax.Array  # Each target sees its own example's encoder tokens.
    cache_index: jax.Array | None = None  # Decoding: int32 scalar, this call's first slot.


class DecoderBlock(nn.Module):
    """Pre-norm block: causal self-attention, cross-attention to the encoder, then MLP."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, y_BLD: jax.Array, args: DecoderArgs, mode: blocks.BlockMode) -> jax.Array:
        """Returns [B, L, D]; when decoding, self-attention uses the KV cache and cross-attention
        the encoder keys/values cached by the call that created the cache (see `Attention`).
        Pass `mode` positionally (see `blocks.rematerialized`)."""
        cfg = self.config
        y_BLD = nn.with_logical_constraint(y_BLD, layers.ACT_NAMES)
        h_BLD = layers.make_norm(cfg, "pre_self_attn_norm")(y_BLD)
        h_BLD = attention.Attention(cfg, name="self_attn")(
            h_BLD,
            h_BLD,
            args.self_bias_BHLS,
            deterministic=mode.deterministic,
            decode=mode.decode,
            cache_index=args.cache_index,
        )
        y_BLD = y_BLD + nn.Dropout(cfg.dropout)(h_BLD, deterministic=mode.deterministic)
        h_BLD = layers.make_norm(cfg, "pre_cross_attn_norm")(y_BLD)
        h_BLD = attention.Attention(cfg, name="cross_attn")(
            h_BLD,
            args.encoded_BSD,
            args.cross_bias_B1LS,
            deterministic=mode.deterministic,
            decode=mode.decode,
            static_kv=True,
        )
        y_BLD = y_BLD + nn.Dropout(cfg.dropout)(h_BLD, deterministic=mode.deterministic)
        h_BLD = layers.make_norm(cfg, "pre_mlp_norm")(y_BLD)
        h_BLD = layers.Mlp(cfg, name="mlp")(h_BLD, deterministic=mode.deterministic)
        y_BLD = y_BLD + nn.Dropout(cfg.dropout)(h_BLD, deterministic=mode.deterministic)
        return nn.with_logical_constraint(y_BLD, layers.ACT_NAMES)


class Encoder(nn.Module):
    """Encoder stack over embedded inputs; returns the normed output [B, S, D].

    Its blocks are `blocks.TransformerBlock` (pre-norm: `pre_attn_norm`, `attn`, `pre_mlp_norm`,
    `mlp`), given the bidirectional relative bias plus the padding mask.
    """

    config: TransformerConfig

    @nn.compact
    def __call__(
        self,
        x_BSD: jax.Array,
        segment_ids_BS: jax.Array,
        positions_BS: jax.Array,
        soft_prompt: adapters.SoftPrompt | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        cfg = self.config
        mask_B1SS = layers.padding_mask(segment_ids_BS, segment_ids_BS)
        bias_BHSS = layers.mask_to_bias(mask_B1SS) + _position_bias(
            _relpos_table(cfg),
            positions_BS,
            positions_BS,
            bidirectional=True,
            max_distance=cfg.relative_max_distance,
        )
        x_BSD = nn.Dropout(cfg.dropout)(x_BSD, deterministic=deterministic)
        if soft_prompt is not None:
            x_BSD, bias_BHSS, _ = soft_prompt.prepend(x_BSD, bias_BHSS)
        block = blocks.rematerialized(blocks.TransformerBlock, cfg)
        x_BSD = blocks.apply_blocks(
            self,
            [block(cfg, name=f"block_{i}") for i in range(cfg.n_layers)],
            x_BSD,
            blocks.BlockArgs(bias=bias_BHSS),
            blocks.BlockMode(deterministic=deterministic),  # Bidirectional, never decoding.
        )
        if soft_prompt is not None:  # The decoder reads the input's positions only.
            x_BSD = soft_prompt.strip(x_BSD)
        x_BSD = layers.make_norm(cfg, "final_norm")(x_BSD)
        x_BSD = nn.Dropout(cfg.dropout)(x_BSD, deterministic=deterministic)
        return nn.with_logical_constraint(x_BSD, layers.ACT_NAMES)


class Decoder(nn.Module):
    """Decoder stack over embedded targets; returns the normed output [B, L, D]."""

    config: TransformerConfig

    @nn.compact
    def __call__(
        self,
        y_BLD: jax.Array,
        segment_ids_BL: jax.Array,
        positions_BL: jax.Array | None,
        encoded_BSD: jax.Array,
        encoder_segment_ids_BS: jax.Array,
        *,
        deterministic: bool = True,
        decode: bool = False,
    ) -> jax.Array:
        """Returns [B, L, D]; with decode, the targets extend the cached ones (see `T5.decode`).

        positions_BL None: arange(L), or when decoding the cache slots index + arange(L).
        """
        cfg = self.config
        cache_index = None
        if decode:
            slots = attention.CacheSlots(name="cache_slots")
            cache_index, positions_BL, kv_segment_ids_BS, kv_positions_BS = slots(
                segment_ids_BL, positions_BL
            )
            self_mask_B1LS = layers.cached_causal_mask(
                segment_ids_BL, kv_segment_ids_BS, cache_index
            )
        else:
            _, positions_BL = layers.segments_and_positions(
                segment_ids_BL.shape, segment_ids_BL, positions_BL
            )
            kv_positions_BS = positions_BL
            self_mask_B1LS = layers.causal_mask(segment_ids_BL)
        self_bias_BHLS = layers.mask_to_bias(self_mask_B1LS) + _position_bias(
            _relpos_table(cfg),
            positions_BL,
            kv_positions_BS,
            bidirectional=False,
            max_distance=cfg.relative_max_distance,
        )
        # A target token sees only the encoder tokens of its own example, never padding.
        cross_mask_B1LS = layers.padding_mask(segment_ids_BL, encoder_segment_ids_BS)
        cross_bias_B1LS = layers.mask_to_bias(cross_mask_B1LS)
        y_BLD = nn.Dropout(cfg.dropout)(y_BLD, deterministic=deterministic)
        block = blocks.rematerialized(DecoderBlock, cfg)
        y_BLD = blocks.apply_blocks(
            self,
            [block(cfg, name=f"block_{i}") for i in range(cfg.n_decoder_layers or cfg.n_layers)],
            y_BLD,
            DecoderArgs(
                encoded_BSD=encoded_BSD,
                self_bias_BHLS=self_bias_BHLS,
                cross_bias_B1LS=cross_bias_B1LS,
                cache_index=cache_index,
            ),
            blocks.BlockMode(deterministic=deterministic, decode=decode),
        )
        y_BLD = layers.make_norm(cfg, "final_norm")(y_BLD)
        y_BLD = nn.Dropout(cfg.dropout)(y_BLD, deterministic=deterministic)
        return nn.with_logical_constraint(y_BLD, layers.ACT_NAMES)


class T5(nn.Module):
    """Encoder-decoder LM; a shared token embedding; logits for the decoder inputs' targets.

    Packed examples: segment ids keep examples apart in all three attentions (a target sees
    only its own example's encoder tokens), and the biases depend only on position differences,
    so packing leaves each example's logits unchanged.
    """

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        layers.check_fixed_fields(cfg, "t5", FIXED_FIELDS)
        self.token_embed = layers.Embed(
            cfg.vocab_size,
            cfg.d_model,
            names=("vocab", "embed"),
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
        )
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.prompt_length:  # Prompt tuning (`kiln.peft`): before the encoder input.
            self.soft_prompt = adapters.SoftPrompt(cfg, name=adapters.PROMPT)
        if not cfg.tie_embeddings:
            self.lm_head = layers.Dense(
                features=(cfg.vocab_size,),
                names=("embed", "vocab"),
                use_bias=False,
                std=cfg.init_std,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
            )

    def encode(
        self,
        encoder_inputs: jax.Array,
        encoder_segment_ids: jax.Array | None = None,
        encoder_positions: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        """Encoder output [B, S, D] of input ids [B, S]; run once per batch when decoding."""
        segment_ids_BS, positions_BS = layers.segments_and_positions(
            encoder_inputs.shape, encoder_segment_ids, encoder_positions
        )
        x_BSD = self.token_embed(encoder_inputs)
        prompt = self.soft_prompt if self.config.prompt_length else None
        return self.encoder(
            x_BSD, segment_ids_BS, positions_BS, prompt, deterministic=deterministic
        )

    def decode(
        self,
        encoded_BSD: jax.Array,
        encoder_segment_ids: jax.Array | None,
        decoder_inputs: jax.Array,
        decoder_segment_ids: jax.Array | None = None,
        decoder_positions: jax.Array | None = None,
        *,
        deterministic: bool = True,
        decode: bool = False,
        head_inputs: bool = False,
    ) -> jax.Array | layers.HeadInputs:
        """Float32 logits [B, L, V] of the decoder inputs [B, L] given the encoder output
        (with head_inputs, what they are made of: `layers.HeadInputs`).

        With decode, the decoder's self-attention keeps a KV cache in the "cache" collection
        (apply with `mutable=["cache"]`): the inputs extend the cached targets, at cache slots
        [index, index + L), with the causal relative bias of the cached positions; positions
        None then means the slot numbers. The first decode call creates the cache with S_max = L
        slots and stores the cross-attention keys and values of encoded_BSD, which later calls
        reuse (they read only its shape); see `kiln.decoding.init_cache`.
        """
        cfg = self.config
        encoder_segment_ids_BS, _ = layers.segments_and_positions(
            encoded_BSD.shape[:2], encoder_segment_ids, None
        )
        segment_ids_BL, _ = layers.segments_and_positions(
            decoder_inputs.shape, decoder_segment_ids, None
        )
        y_BLD = self.token_embed(decoder_inputs)
        y_BLD = self.decoder(
            y_BLD,
            segment_ids_BL,
            decoder_positions,
            encoded_BSD,
            encoder_segment_ids_BS,
            deterministic=deterministic,
            decode=decode,
        )
        if head_inputs and cfg.tie_embeddings:
            return layers.HeadInputs(y_BLD * cfg.d_model**-0.5, self.token_embed.table())
        if head_inputs:
            return layers.HeadInputs(y_BLD, self.lm_head.transposed_kernel())
        if cfg.tie_embeddings:
            # T5 rescales before the tied projection, as the embedding is also the input table.
            logits_BLV = self.token_embed.attend(y_BLD * cfg.d_model**-0.5)
        else:
            logits_BLV = self.lm_head(y_BLD)
        logits_BLV = logits_BLV.astype(jnp.float32)
        return nn.with_logical_constraint(logits_BLV, ("act_batch", "act_length", "act_vocab"))

    def __call__(
        self,
        encoder_inputs: jax.Array,
        decoder_inputs: jax.Array,
        encoder_segment_ids: jax.Array | None = None,
        decoder_segment_ids: jax.Array | None = None,
        encoder_positions: jax.Array | None = None,
        decoder_positions: jax.Array | None = None,
        *,
        deterministic: bool = True,
        head_inputs: bool = False,
    ) -> jax.Array | layers.HeadInputs:
        """Returns float32 logits [B, L, V] for the decoder inputs (teacher forcing).

        Argument names match the batch keys of the span-corruption objective.

        Args:
          encoder_inputs: corrupted input ids [B, S].
          decoder_inputs: target ids shifted right [B, L].
          encoder_segment_ids: example ids [B, S], 0 for padding; None means one per row.
          decoder_segment_ids: example ids [B, L] matching the encoder's; None: one per row.
          encoder_positions: position within the example [B, S]; None means arange(S).
          decoder_positions: position within the example [B, L]; None means arange(L).
          deterministic: disables dropout; otherwise the "dropout" rng collection is used.
          head_inputs: return what the logits are made of instead (`layers.HeadInputs`).
        """
        encoded_BSD = self.encode(
            encoder_inputs, encoder_segment_ids, encoder_positions, deterministic=deterministic
        )
        return self.decode(
            encoded_BSD,
            encoder_segment_ids,
            decoder_inputs,
            decoder_segment_ids,
            decoder_positions,
            deterministic=deterministic,
            head_inputs=head_inputs,
        )
