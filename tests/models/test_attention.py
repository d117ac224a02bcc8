"""Tests for kiln.models.attention against plain NumPy references."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpy_refs
import pytest

from kiln.models import attention, layers
from kiln.models.layers import TransformerConfig

CFG = TransformerConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=48, max_len=16
)


@functools.cache
def _init_attention(cfg: TransformerConfig):
    x = jnp.zeros((1, 2, cfg.d_model))
    return jax.jit(attention.Attention(cfg).init)(jax.random.key(0), x, x)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_self_attention_matches_numpy(n_kv_heads):
    cfg = dataclasses.replace(CFG, n_kv_heads=n_kv_heads)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 10, cfg.d_model)).astype(np.float32)
    seg = np.array([[1] * 4 + [2] * 6, [1] * 7 + [0] * 3])
    mask = np.asarray(layers.causal_mask(jnp.asarray(seg)))
    bias = layers.mask_to_bias(mask)
    attn = attention.Attention(cfg)
    variables = _init_attention(cfg)
    # Non-zero biases, so a mistake in their shapes or use shows up.
    variables = jax.tree.map(lambda a: a + 0.1 * jnp.ones_like(a), variables)
    out = jax.jit(attn.apply)(variables, x, x, bias)
    want = numpy_refs.attention(numpy_refs.params(variables), x, x, mask, cfg.n_heads, n_kv_heads)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


def test_cross_attention_with_float_bias_matches_numpy():
    cfg = dataclasses.replace(CFG, n_kv_heads=2, use_bias=False)
    rng = np.random.default_rng(1)
    xq = rng.normal(size=(2, 5, cfg.d_model)).astype(np.float32)
    xkv = rng.normal(size=(2, 7, cfg.d_model)).astype(np.float32)
    rel_bias = rng.normal(size=(1, cfg.n_heads, 5, 7)).astype(np.float32)  # T5-like, per head.
    mask = np.ones((2, 1, 5, 7), bool)
    mask[1, :, :, 4:] = False
    attn = attention.Attention(cfg)
    bias = rel_bias + layers.mask_to_bias(jnp.asarray(mask))
    variables = jax.jit(attn.init)(jax.random.key(0), xq, xkv, bias)
    out = jax.jit(attn.apply)(variables, xq, xkv, bias)
    p = numpy_refs.params(variables)
    q = np.einsum("bld,dhe->blhe", xq, p["query"]["kernel"])
    k = np.repeat(np.einsum("bsd,dke->bske", xkv, p["key"]["kernel"]), 2, axis=2)
    v = np.repeat(np.einsum("bsd,dke->bske", xkv, p["value"]["kernel"]), 2, axis=2)
    scores = np.einsum("blhe,bshe->bhls", q, k) / np.sqrt(cfg.head_dim) + rel_bias
    probs = numpy_refs.softmax(np.where(mask, scores, -np.inf))
    want = np.einsum("bhls,bshe,hed->bld", probs, v, p["out"]["kernel"])
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


def test_unscaled_attention_logits_are_sqrt_head_dim_larger():
    cfg = dataclasses.replace(CFG, scale_attention=False)
    x = np.random.default_rng(7).normal(size=(2, 6, cfg.d_model)).astype(np.float32)
    mask = np.ones((2, 1, 6, 6), bool)
    bias = layers.mask_to_bias(jnp.asarray(mask))
    variables = jax.tree.map(lambda a: a + 0.1 * jnp.ones_like(a), _init_attention(CFG))
    unscaled = jax.jit(attention.Attention(cfg).apply)(variables, x, x, bias)
    p = numpy_refs.params(variables)
    want = numpy_refs.attention(p, x, x, mask, cfg.n_heads, cfg.n_kv_heads, scale=False)
    np.testing.assert_allclose(unscaled, want, atol=1e-5, rtol=1e-5)
    scaled = jax.jit(attention.Attention(CFG).apply)(variables, x, x, bias)
    assert not np.allclose(scaled, unscaled, atol=1e-3)
    # Queries divided by sqrt(E) make the unscaled logits equal the default scaled ones.
    query = jax.tree.map(lambda a: a / np.sqrt(cfg.head_dim), variables["params"]["query"])
    shrunk = {"params": variables["params"] | {"query": query}}
    np.testing.assert_allclose(
        jax.jit(attention.Attention(cfg).apply)(shrunk, x, x, bias), scaled, atol=1e-5, rtol=1e-5
    )


def test_fully_masked_query_gives_finite_output():
    x = jnp.ones((1, 4, CFG.d_model))
    bias = layers.mask_to_bias(jnp.zeros((1, 1, 4, 4), bool))
    attn = attention.Attention(CFG)
    out = jax.jit(attn.apply)(_init_attention(CFG), x, x, bias)
    assert np.isfinite(np.asarray(out)).all()


def test_separate_head_dim_matches_numpy():
    # T5's d_kv: 4 heads of 12 (48 != d_model 32) over 2 kv heads; the output projects back.
    cfg = dataclasses.replace(CFG, n_kv_heads=2, head_dim=12)
    x = np.random.default_rng(2).normal(size=(2, 6, cfg.d_model)).astype(np.float32)
    mask = np.asarray(layers.causal_mask(jnp.asarray([[1] * 6, [1] * 4 + [0] * 2])))
    variables = jax.tree.map(lambda a: a + 0.1 * jnp.ones_like(a), _init_attention(cfg))
    p = numpy_refs.params(variables)
    assert p["query"]["kernel"].shape == (32, 4, 12) and p["key"]["kernel"].shape == (32, 2, 12)
    assert p["out"]["kernel"].shape == (4, 12, 32)
    out = jax.jit(attention.Attention(cfg).apply)(variables, x, x, layers.mask_to_bias(mask))
    want = numpy_refs.attention(p, x, x, mask, cfg.n_heads, cfg.n_kv_heads)  # / sqrt(12).
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
