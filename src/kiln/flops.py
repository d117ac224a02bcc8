"""Model FLOPs per token and the device peak they are divided by for MFU.

Training FLOPs per token = 3 x forward (backward costs twice the forward), where forward =
2 x (matmul parameters, the output projection onto the vocabulary included)
+ 4 x n_layers x seq_len x d_model for attention scores and the weighted sum of values.
Causal attention is counted as the full L x L product (as PaLM's appendix B does), so the same
formula serves every family and every peer.
"""

import functools
import time

import jax
import jax.numpy as jnp

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


def matmul_params(model: dict) -> int:
    """Parameters that take part in a matmul per token (embedding lookups excluded)."""
    d, f, h, k = model["d_model"], model["d_ff"], model["n_heads"], model["n_kv_heads"]
    head_dim = d // h
    attention = d * head_dim * (2 * h + 2 * k)
    mlp = d * f * (3 if model["mlp"] in ("swiglu", "geglu") else 2)
    return model["n_layers"] * (attention + mlp) + d * model["vocab_size"]


def train_flops_per_token(model: dict, seq_len: int) -> float:
    forward = 2 * matmul_params(model) + 4 * model["n_layers"] * seq_len * model["d_model"]
    return 3.0 * forward


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
