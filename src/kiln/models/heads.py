"""Task heads on the pre-trained bodies; their parameter trees extend the body's.

`BertClassifier` pools the first token ([CLS]) through a dense + tanh `pooler`, then a linear
`classifier`; `GPTClassifier` reads the last real token of each row (a decoder sees the whole
input only there) through a linear `classifier`; `BertSpanHead` scores every position as an
answer's start or end (extractive QA) with a two-output `classifier`. All leave the body's
parameter names as they are in pre-training, so `init_from` loads the body and only the heads
start fresh.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from kiln.models import bert, gpt, layers


def _classifier(cfg: layers.TransformerConfig, num_classes: int) -> layers.Dense:
    return layers.Dense(
        (num_classes,),
        ("embed", "classes"),
        std=cfg.init_std,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        name="classifier",
    )


def last_positions(segment_ids_BL: jax.Array) -> jax.Array:
    """Index of the last non-padding token of each row [B] (0 for an all-padding row)."""
    length = segment_ids_BL.shape[1]
    real_BL = segment_ids_BL != 0
    last_from_end_B = jnp.argmax(real_BL[:, ::-1], axis=1)
    return jnp.where(real_BL.any(axis=1), length - 1 - last_from_end_B, 0)


def mean_pool(x_BLD: jax.Array, segment_ids_BL: jax.Array | None) -> jax.Array:
    """Mean of the hidden states of each row's real tokens [B, D]."""
    if segment_ids_BL is None:
        return x_BLD.mean(axis=1)
    real_BL1 = (segment_ids_BL != 0)[..., None].astype(x_BLD.dtype)
    return (x_BLD * real_BL1).sum(axis=1) / jnp.maximum(real_BL1.sum(axis=1), 1.0)


class _BertTaskModel(bert.BERT):
    """A BERT body and a task head: `__call__` encodes the inputs (the arguments of
    `BERT.encode`) and hands the hidden states to `head`."""

    def __call__(
        self,
        inputs: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        x_BLD = self.encode(
            inputs, segment_ids, positions, token_type_ids, deterministic=deterministic
        )
        return self.head(x_BLD, segment_ids, deterministic)

    def head(
        self, x_BLD: jax.Array, segment_ids: jax.Array | None, deterministic: bool
    ) -> jax.Array:
        raise NotImplementedError


class BertClassifier(_BertTaskModel):
    """Sequence classification logits [B, num_classes] from the [CLS] position (`pooling="cls"`,
    BERT's choice) or the mean over the row's real tokens (`pooling="mean"`)."""

    num_classes: int = 2
    pooling: str = "cls"

    def setup(self):
        super().setup()
        cfg = self.config
        self.pooler = layers.Dense(
            (cfg.d_model,),
            ("embed", "mlp"),
            std=cfg.init_std,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
        )
        self.pool_dropout = nn.Dropout(cfg.dropout)
        self.classifier = _classifier(cfg, self.num_classes)

    def head(
        self, x_BLD: jax.Array, segment_ids: jax.Array | None, deterministic: bool
    ) -> jax.Array:
        first_BD = x_BLD[:, 0] if self.pooling == "cls" else mean_pool(x_BLD, segment_ids)
        pooled_BD = jnp.tanh(self.pooler(first_BD))
        pooled_BD = self.pool_dropout(pooled_BD, deterministic=deterministic)
        return self.classifier(pooled_BD).astype(jnp.float32)


class GPTClassifier(gpt.GPT):
    """Sequence classification logits [B, num_classes] from each row's last real token
    (`pooling="last"`, the one that has seen the whole input) or the mean (`pooling="mean"`)."""

    num_classes: int = 2
    pooling: str = "last"

    def setup(self):
        super().setup()
        self.classifier = _classifier(self.config, self.num_classes)

    def __call__(
        self,
        inputs: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        x_BLD = self.hidden(inputs, segment_ids, positions, deterministic=deterministic)
        segment_ids_BL, _ = layers.segments_and_positions(inputs.shape, segment_ids, positions)
        if self.pooling == "mean":
            pooled_BD = mean_pool(x_BLD, segment_ids_BL)
        else:
            last_B = last_positions(segment_ids_BL)
            pooled_BD = jnp.take_along_axis(x_BLD, last_B[:, None, None], axis=1)[:, 0]
        return self.classifier(pooled_BD).astype(jnp.float32)


class BertSpanHead(_BertTaskModel):
    """Extractive question answering: start and end logits [B, 2, L] of the answer span over
    every position (`pooling="span"`: nothing is pooled); padding positions get -1e9, so a
    softmax over L never picks them."""

    num_classes: int = 2  # start, end
    pooling: str = "span"

    def setup(self):
        super().setup()
        self.classifier = _classifier(self.config, 2)

    def head(
        self, x_BLD: jax.Array, segment_ids: jax.Array | None, deterministic: bool
    ) -> jax.Array:
        logits_B2L = jnp.swapaxes(self.classifier(x_BLD).astype(jnp.float32), 1, 2)
        if segment_ids is None:
            return logits_B2L
        return jnp.where((segment_ids != 0)[:, None, :], logits_B2L, -1e9)
