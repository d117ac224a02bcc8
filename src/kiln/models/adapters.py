"""Parameter-efficient fine-tuning inside the model: the soft prompt of prompt tuning, and
folding LoRA adapters into their kernels. The LoRA path itself is part of `layers.Dense`.

Shape suffixes as in `layers.py`; P is the prompt length.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kiln.models import masks
from kiln.models.layers import TransformerConfig

PROMPT = "soft_prompt"  # the top-level module (and parameter path) of the soft prompt
LORA_PARAMS = ("lora_a", "lora_b")


class SoftPrompt(nn.Module):
    """A learned prompt `embedding` [P, D] before every row's embedded input (prompt tuning).

    `prepend` widens the input, the attention bias (`masks.prompt_bias`) and the rope positions
    (the prompt at position 0); `strip` drops the prompt's positions again after the blocks, so
    heads, pooling and losses read the input's own positions, as without a prompt.
    """

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
            (cfg.prompt_length, cfg.d_model),
            cfg.param_dtype,
        )

    def prepend(
        self, x_BLD: jax.Array, bias_BHLS: jax.Array, positions_BL: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """(x, bias, positions) over the P + L positions [prompt; input]."""
        batch, p = x_BLD.shape[0], self.config.prompt_length
        prompt_BPD = jnp.broadcast_to(
            self.embedding.astype(x_BLD.dtype), (batch, *self.embedding.shape)
        )
        x_BLD = jnp.concatenate([prompt_BPD, x_BLD], axis=1)
        if positions_BL is not None:
            zeros_BP = jnp.zeros((batch, p), positions_BL.dtype)
            positions_BL = jnp.concatenate([zeros_BP, positions_BL], axis=1)
        return x_BLD, masks.prompt_bias(bias_BHLS, p), positions_BL

    def strip(self, x_BLD: jax.Array) -> jax.Array:
        """The input's positions of [prompt; input] states."""
        return x_BLD[:, self.config.prompt_length :]


def merge_lora(params: dict[str, Any], rank: int, alpha: float) -> dict[str, Any]:
    """`params` (NumPy, per layer) with every LoRA pair folded into its kernel,
    kernel + (alpha / rank) * lora_a . lora_b, and the pairs removed: a plain model's tree."""

    def fold(tree: dict[str, Any]) -> dict[str, Any]:
        out = {
            k: fold(v) if isinstance(v, dict) else v
            for k, v in tree.items()
            if k not in LORA_PARAMS
        }
        if "lora_a" in tree:
            a, b, kernel = (np.asarray(tree[k], np.float32) for k in ("lora_a", "lora_b", "kernel"))
            delta = a.reshape(-1, rank) @ b.reshape(rank, -1) * (alpha / rank)
            out["kernel"] = (kernel + delta.reshape(kernel.shape)).astype(
                np.asarray(tree["kernel"]).dtype
            )
        return out

    return fold(params)
