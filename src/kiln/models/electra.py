"""ELECTRA's replaced-token detection (Clark et al. 2020) for the BERT family.

A small masked-LM generator fills the masked positions with tokens sampled from its own
predictions; the BERT body (the discriminator) then reads the whole corrupted row and says, at
every real token, whether it was replaced. The discriminator learns from every token, not only
the masked ones, which is what makes ELECTRA cheap at small budgets. Its parameters have the
exact names of a `BERT`'s body, so a fine-tuning run starts from them as from an MLM run; the
generator (`generator/...`) and the detection head (`rtd_head/...`) are left behind, reported as
"not used" by `init_from`.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kiln.models import bert, layers
from kiln.models.layers import TransformerConfig


class ElectraOutput(NamedTuple):
    """What the loss needs: the generator's logits at the predicted positions [B, C, V] (or
    every position [B, L, V]), the discriminator's replaced-token logits [B, L], and which
    tokens the generator's samples actually changed [B, L] (a sample equal to the original
    token counts as original, as in the paper)."""

    generator_logits: jax.Array
    detection_logits: jax.Array
    replaced: jax.Array


def generator_config(cfg: TransformerConfig, fraction: float) -> TransformerConfig:
    """The generator's layers: the discriminator's depth and head width, `fraction` of its heads
    (at least one) and of its feed-forward width (the paper's best generators are 1/4 to 1/2
    of the discriminator; `objectives.check_options` checks the fraction)."""
    head_dim = cfg.d_model // cfg.n_heads
    heads = max(1, round(cfg.n_heads * fraction))
    return dataclasses.replace(
        cfg,
        d_model=heads * head_dim,
        n_heads=heads,
        n_kv_heads=heads,
        d_ff=max(1, round(cfg.d_ff * fraction)),
        prompt_length=0,
        lora_rank=0,
    )


def corrupt(
    inputs_BL: jax.Array,
    predict_positions_BC: jax.Array | None,
    selected: jax.Array,
    sampled: jax.Array,
) -> jax.Array:
    """`inputs` with each selected prediction slot's token replaced by its sample.

    With `predict_positions` [B, C], `selected` and `sampled` are [B, C] (padding slots are not
    selected and point at position 0); without, they are [B, L]. The replacement adds the
    difference at each slot, so padding slots add 0 and never collide with a real slot."""
    inputs_BL = jnp.asarray(inputs_BL)
    if predict_positions_BC is None:
        return jnp.where(selected > 0, sampled, inputs_BL)
    current_BC = jnp.take_along_axis(inputs_BL, predict_positions_BC, axis=1)
    delta_BC = jnp.where(selected > 0, sampled - current_BC, 0).astype(inputs_BL.dtype)
    rows_B1 = jnp.arange(inputs_BL.shape[0])[:, None]
    return inputs_BL.at[rows_B1, predict_positions_BC].add(delta_BC)


class Electra(bert.BERT):
    """A BERT body trained as ELECTRA's discriminator, with its masked-LM generator.

    The body, its embeddings and norms are those of `BERT` (same names); `generator` is a
    smaller `BERT` (`generator_config`); `rtd_head` is dense + GELU + a one-output dense."""

    generator_fraction: float = 0.5

    def setup(self):
        super().setup()
        cfg = self.config
        self.generator = bert.BERT(generator_config(cfg, self.generator_fraction))
        kw = dict(std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.rtd_transform = layers.Dense((cfg.d_model,), ("embed", "mlp"), **kw)
        self.rtd_output = layers.Dense((1,), ("embed", "classes"), **kw)

    def __call__(
        self,
        inputs: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        predict_positions: jax.Array | None = None,
        *,
        original: jax.Array | None = None,
        selected: jax.Array | None = None,
        sample_key: jax.Array | None = None,
        deterministic: bool = True,
    ) -> ElectraOutput:
        """The generator's logits, the discriminator's logits and the replaced tokens.

        `inputs` ... `predict_positions` are the masked-LM batch's (`BERT.__call__`);
        `original` are its `targets` (the tokens before masking) and `selected` its `weights`
        (1 on the real prediction slots); None (at `init`) means every slot, tokens unchanged.
        The generator's samples (temperature 1, from `sample_key`; key 0 if None) are integers,
        which carry no gradient: the detection loss trains the discriminator only."""
        generator_logits = self.generator(
            inputs,
            segment_ids,
            positions,
            token_type_ids,
            predict_positions,
            deterministic=deterministic,
        )
        key = jax.random.PRNGKey(0) if sample_key is None else sample_key
        sampled = jax.random.categorical(key, generator_logits)
        sampled = sampled.astype(inputs.dtype)
        if original is None:
            original = sampled
        if selected is None:
            selected = jnp.ones(sampled.shape, jnp.float32)
        changed = (selected > 0) & (sampled != original)
        corrupted_BL = corrupt(inputs, predict_positions, selected, sampled)
        replaced_BL = corrupt(
            jnp.zeros_like(inputs), predict_positions, changed, jnp.ones_like(sampled)
        )
        x_BLD = self.encode(
            corrupted_BL, segment_ids, positions, token_type_ids, deterministic=deterministic
        )
        h_BLD = layers.gelu(self.config)(self.rtd_transform(x_BLD))
        detection_BL = self.rtd_output(h_BLD)[..., 0].astype(jnp.float32)
        return ElectraOutput(generator_logits, detection_BL, replaced_BL)
