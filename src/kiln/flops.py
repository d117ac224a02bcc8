"""Model FLOPs of a train step and the device peak they are divided by for MFU.

Training FLOPs = 3 x forward (the backward pass costs twice the forward). Forward FLOPs per
token = 2 x (matmul parameters the token passes through, the output projection onto the
vocabulary included) + 4 x d_model x (keys it attends to) per attention layer, for the scores
and the weighted sum of values. Every attention is counted as the full product: causal
attention is not halved (as in PaLM's appendix B), so the formula is the same for every family
and every peer. Per family:
- gpt, bert: every token passes through n_layers blocks and attends to seq_len keys (bert adds
  the d_model x d_model transform of its MLM head). When the batch names the positions the loss
  needs (`predict_positions`, bert's masked tokens), the head is counted at those only, for
  every system measured on that batch: the other positions' logits are work no loss uses.
- t5: encoder tokens pass through the encoder blocks and attend to the encoder length; decoder
  tokens pass through the decoder blocks (self-attention, cross-attention, MLP), attend to the
  decoder length and the encoder length, and are projected onto the vocabulary.
"""

import functools
import time

import jax
import jax.numpy as jnp

from kiln import models
from kiln.data.objectives import Layout

# Dense peak FLOP/s per chip for the compute dtype, from vendor data sheets.
_PEAKS = {
    ("H200", "bfloat16"): 989e12,
    ("H100", "bfloat16"): 989e12,
    ("A100", "bfloat16"): 312e12,
    ("H200", "float32"): 67e12,
    ("H100", "float32"): 67e12,
    ("A100", "float32"): 19.5e12,
    ("TPU v4", "bfloat16"): 275e12,
    ("TPU v5 lite", "bfloat16"): 197e12,
    ("TPU v5", "bfloat16"): 459e12,
    ("TPU v6 lite", "bfloat16"): 918e12,
}


def _head_dim(model: dict) -> int:
    return model.get("head_dim") or model["d_model"] // model["n_heads"]


def _attention_width(model: dict) -> int:
    """Width of the attention scores' contractions: n_heads * head_dim (d_model unless
    `head_dim` is set, as in T5 checkpoints with d_kv != d_model / n_heads)."""
    return model["n_heads"] * _head_dim(model)


def _attention_params(model: dict) -> int:
    d, h, k = model["d_model"], model["n_heads"], model["n_kv_heads"]
    return d * _head_dim(model) * (2 * h + 2 * k)


def _mlp_params(model: dict) -> int:
    return model["d_model"] * model["d_ff"] * (3 if model["mlp"] in ("swiglu", "geglu") else 2)


def _encoder_decoder(model: dict) -> bool:
    return models.family(model["family"]).layout == Layout.ENCODER_DECODER


def _head_params(model: dict) -> int:
    """Matmul parameters of the output head (with bert's d x d transform)."""
    d = model["d_model"]
    transform = models.family(model["family"]).lm_head_transform
    return d * model["vocab_size"] + (d * d if transform else 0)


def matmul_params(model: dict) -> int:
    """Matmul parameters per decoder/encoder token (embedding lookups excluded).

    For t5 this is the decoder side (self- and cross-attention, MLP, output projection).
    """
    block = _attention_params(model) + _mlp_params(model)
    if _encoder_decoder(model):
        layers = model.get("n_decoder_layers") or model["n_layers"]
        return layers * (block + _attention_params(model)) + _head_params(model)
    return model["n_layers"] * block + _head_params(model)


def train_flops_per_step(
    model: dict, rows: int, length: int, decoder_length: int = 0, predicted: int | None = None
) -> float:
    """Model FLOPs of one train step over `rows` sequences (t5: also `decoder_length`);
    `predicted`: the head runs at that many positions per row only (bert's masked positions)."""
    d = _attention_width(model)
    if not _encoder_decoder(model):
        forward = 2 * matmul_params(model) + 4 * model["n_layers"] * length * d
        total = rows * length * forward
        if predicted is not None:
            total -= rows * (length - predicted) * 2 * _head_params(model)
        return 3.0 * total
    encoder = 2 * model["n_layers"] * (_attention_params(model) + _mlp_params(model))
    encoder += 4 * model["n_layers"] * length * d
    decoder_layers = model.get("n_decoder_layers") or model["n_layers"]
    decoder = 2 * matmul_params(model) + 4 * decoder_layers * (decoder_length + length) * d
    return 3.0 * rows * (length * encoder + decoder_length * decoder)


def train_flops_per_token(model: dict, seq_len: int) -> float:
    """Per token of a decoder-only or encoder-only model (see the module docstring)."""
    return train_flops_per_step(model, 1, seq_len) / seq_len


@functools.cache
def peak_flops_per_device(dtype: str = "float32") -> float:
    """Data-sheet peak for known accelerators; on CPUs a measured jitted matmul rate."""
    device = jax.devices()[0]
    for (kind, peak_dtype), peak in _PEAKS.items():
        if kind in device.device_kind and peak_dtype == dtype:
            return peak
    return measure_matmul_flops(dtype)


def measure_matmul_flops(dtype: str = "float32", n: int = 1024, repeats: int = 8) -> float:
    """Best-of-`repeats` FLOP/s of an n x n matmul on the default device."""
    a = jnp.ones((n, n), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def step_cost(model: dict, shapes: dict[str, tuple[int, ...]], rows: int) -> tuple[int, float]:
    """(tokens, model FLOPs) of one train step over a global batch of `rows` with these shapes."""
    if "encoder_inputs" in shapes:
        length, decoder_length = shapes["encoder_inputs"][1], shapes["decoder_inputs"][1]
        tokens = rows * (length + decoder_length)
        return tokens, train_flops_per_step(model, rows, length, decoder_length)
    length = shapes["inputs"][1]
    if len(shapes.get("targets", (rows, length))) == 1:  # A classifier: no vocabulary logits.
        model = {**model, "vocab_size": 0}
    predicted = shapes["predict_positions"][1] if "predict_positions" in shapes else None
    return rows * length, train_flops_per_step(model, rows, length, predicted=predicted)
