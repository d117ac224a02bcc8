"""NumPy references of the layers, shared by the tests of `layers`, `attention` and `blocks`."""

import math

import flax.linen as nn
import jax
import numpy as np


def params(variables):
    """The "params" of linen variables as NumPy arrays, unboxed."""
    return jax.tree.map(np.asarray, nn.meta.unbox(variables)["params"])


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def gelu_erf(x):
    """Exact GELU, x * Phi(x), with the standard normal CDF from math.erf."""
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))


def layernorm(x, eps, scale=1.0, bias=0.0):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * scale + bias


def attention(p, xq, xkv, mask, n_heads, n_kv_heads, scale=True):
    """softmax(Q K^T / sqrt(E) + mask) V, with kv heads repeated for their query groups.

    Without `scale`, the logits are not divided by sqrt(E).
    """
    q = np.einsum("bld,dhe->blhe", xq, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("bsd,dke->bske", xkv, p["key"]["kernel"]) + p["key"]["bias"]
    v = np.einsum("bsd,dke->bske", xkv, p["value"]["kernel"]) + p["value"]["bias"]
    k = np.repeat(k, n_heads // n_kv_heads, axis=2)  # Head h reads kv head h // G.
    v = np.repeat(v, n_heads // n_kv_heads, axis=2)
    scores = np.einsum("blhe,bshe->bhls", q, k) / (np.sqrt(q.shape[-1]) if scale else 1.0)
    scores = np.where(mask, scores, -np.inf)
    out = np.einsum("bhls,bshe->blhe", softmax(scores), v)
    return np.einsum("blhe,hed->bld", out, p["out"]["kernel"]) + p["out"]["bias"]


def rope(x, pos, theta):
    """Rotation of the complex numbers x[i] + 1j * x[i + E/2] by pos * theta^(-2i/E)."""
    half = x.shape[-1] // 2
    angle = pos[:, :, None, None] * theta ** (-2.0 * np.arange(half) / x.shape[-1])
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angle)
    return np.concatenate([z.real, z.imag], axis=-1)
