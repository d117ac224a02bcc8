"""Tests for kiln.models.layers against plain NumPy references."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kiln.errors import KilnError
from kiln.models import layers
from kiln.models.layers import TransformerConfig

CFG = TransformerConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=48, max_len=16
)


@functools.cache
def _init_attention(cfg: TransformerConfig):
    x = jnp.zeros((1, 2, cfg.d_model))
    return jax.jit(layers.Attention(cfg).init)(jax.random.key(0), x, x)


def _np_params(variables):
    return jax.tree.map(np.asarray, nn.meta.unbox(variables)["params"])


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _np_layernorm(x, eps, scale=1.0, bias=0.0):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * scale + bias


def _np_attention(p, xq, xkv, mask, n_heads, n_kv_heads, scale=True):
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
    out = np.einsum("bhls,bshe->blhe", _np_softmax(scores), v)
    return np.einsum("blhe,hed->bld", out, p["out"]["kernel"]) + p["out"]["bias"]


def _np_rope(x, pos, theta):
    """Rotation of the complex numbers x[i] + 1j * x[i + E/2] by pos * theta^(-2i/E)."""
    half = x.shape[-1] // 2
    angle = pos[:, :, None, None] * theta ** (-2.0 * np.arange(half) / x.shape[-1])
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angle)
    return np.concatenate([z.real, z.imag], axis=-1)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_self_attention_matches_numpy(n_kv_heads):
    cfg = dataclasses.replace(CFG, n_kv_heads=n_kv_heads)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 10, cfg.d_model)).astype(np.float32)
    seg = np.array([[1] * 4 + [2] * 6, [1] * 7 + [0] * 3])
    mask = np.asarray(layers.causal_mask(jnp.asarray(seg)))
    bias = layers.mask_to_bias(mask)
    attn = layers.Attention(cfg)
    variables = _init_attention(cfg)
    # Non-zero biases, so a mistake in their shapes or use shows up.
    variables = jax.tree.map(lambda a: a + 0.1 * jnp.ones_like(a), variables)
    out = jax.jit(attn.apply)(variables, x, x, bias)
    want = _np_attention(_np_params(variables), x, x, mask, cfg.n_heads, n_kv_heads)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


def test_cross_attention_with_float_bias_matches_numpy():
    cfg = dataclasses.replace(CFG, n_kv_heads=2, use_bias=False)
    rng = np.random.default_rng(1)
    xq = rng.normal(size=(2, 5, cfg.d_model)).astype(np.float32)
    xkv = rng.normal(size=(2, 7, cfg.d_model)).astype(np.float32)
    rel_bias = rng.normal(size=(1, cfg.n_heads, 5, 7)).astype(np.float32)  # T5-like, per head.
    mask = np.ones((2, 1, 5, 7), bool)
    mask[1, :, :, 4:] = False
    attn = layers.Attention(cfg)
    bias = rel_bias + layers.mask_to_bias(jnp.asarray(mask))
    variables = jax.jit(attn.init)(jax.random.key(0), xq, xkv, bias)
    out = jax.jit(attn.apply)(variables, xq, xkv, bias)
    p = _np_params(variables)
    q = np.einsum("bld,dhe->blhe", xq, p["query"]["kernel"])
    k = np.repeat(np.einsum("bsd,dke->bske", xkv, p["key"]["kernel"]), 2, axis=2)
    v = np.repeat(np.einsum("bsd,dke->bske", xkv, p["value"]["kernel"]), 2, axis=2)
    scores = np.einsum("blhe,bshe->bhls", q, k) / np.sqrt(cfg.head_dim) + rel_bias
    probs = _np_softmax(np.where(mask, scores, -np.inf))
    want = np.einsum("bhls,bshe,hed->bld", probs, v, p["out"]["kernel"])
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


def test_unscaled_attention_logits_are_sqrt_head_dim_larger():
    cfg = dataclasses.replace(CFG, scale_attention=False)
    x = np.random.default_rng(7).normal(size=(2, 6, cfg.d_model)).astype(np.float32)
    mask = np.ones((2, 1, 6, 6), bool)
    bias = layers.mask_to_bias(jnp.asarray(mask))
    variables = jax.tree.map(lambda a: a + 0.1 * jnp.ones_like(a), _init_attention(CFG))
    unscaled = jax.jit(layers.Attention(cfg).apply)(variables, x, x, bias)
    p = _np_params(variables)
    want = _np_attention(p, x, x, mask, cfg.n_heads, cfg.n_kv_heads, scale=False)
    np.testing.assert_allclose(unscaled, want, atol=1e-5, rtol=1e-5)
    scaled = jax.jit(layers.Attention(CFG).apply)(variables, x, x, bias)
    assert not np.allclose(scaled, unscaled, atol=1e-3)
    # Queries divided by sqrt(E) make the unscaled logits equal the default scaled ones.
    query = jax.tree.map(lambda a: a / np.sqrt(cfg.head_dim), variables["params"]["query"])
    shrunk = {"params": variables["params"] | {"query": query}}
    np.testing.assert_allclose(
        jax.jit(layers.Attention(cfg).apply)(shrunk, x, x, bias), scaled, atol=1e-5, rtol=1e-5
    )


def test_fully_masked_query_gives_finite_output():
    x = jnp.ones((1, 4, CFG.d_model))
    bias = layers.mask_to_bias(jnp.zeros((1, 1, 4, 4), bool))
    attn = layers.Attention(CFG)
    out = jax.jit(attn.apply)(_init_attention(CFG), x, x, bias)
    assert np.isfinite(np.asarray(out)).all()


def test_rope_matches_numpy():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 6, 3, 8)).astype(np.float32)
    pos = rng.integers(0, 100, size=(2, 6))
    out = layers.apply_rope(jnp.asarray(x), jnp.asarray(pos), 10000.0)
    np.testing.assert_allclose(out, _np_rope(x, pos, 10000.0), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(layers.apply_rope(x, 0 * pos, 10000.0), x)  # Position 0: identity.


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(1, 5, 2, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 5, 2, 16)), jnp.float32)
    pos = jnp.asarray([[0, 3, 4, 9, 11]])

    def scores(q_pos, k_pos):
        q_rot, k_rot = layers.apply_rope(q, q_pos, 10000.0), layers.apply_rope(k, k_pos, 10000.0)
        return np.asarray(jnp.einsum("blhe,bshe->bhls", q_rot, k_rot))

    base = scores(pos, pos)
    np.testing.assert_allclose(scores(pos + 37, pos + 37), base, atol=1e-4, rtol=1e-4)
    assert not np.allclose(scores(pos + 3, pos), base, atol=1e-2)  # Relative shift matters.


def test_masks():
    seg = jnp.asarray([[1, 1, 2, 2, 0]])
    got = np.asarray(layers.causal_mask(seg))
    want = np.array([[s <= t and seg[0, s] == seg[0, t] for s in range(5)] for t in range(5)])
    assert got.shape == (1, 1, 5, 5) and got.dtype == bool
    np.testing.assert_array_equal(got[0, 0], want)
    pad = np.asarray(layers.padding_mask(jnp.asarray([[1, 1, 0]]), jnp.asarray([[1, 0, 1, 1]])))
    assert pad.shape == (1, 1, 3, 4)
    np.testing.assert_array_equal(pad[0, 0], [[1, 0, 1, 1], [1, 0, 1, 1], [0, 1, 0, 0]])
    prefix = jnp.asarray([[1, 0, 1, 1, 0, 0, 1]])
    seg7 = jnp.asarray([[1, 1, 2, 2, 2, 0, 0]])
    got_prefix = np.asarray(layers.prefix_lm_mask(seg7, prefix))
    same = seg7[0][:, None] == seg7[0][None, :]
    causal_or_prefix = np.tri(7, dtype=bool) | (np.asarray(prefix[0]) == 1)[None, :]
    assert got_prefix.shape == (1, 1, 7, 7) and got_prefix.dtype == bool
    np.testing.assert_array_equal(got_prefix[0, 0], same & causal_or_prefix)
    assert got_prefix[0, 0, 2, 3] and not got_prefix[0, 0, 0, 1]  # Prefix key later vs not.
    zeros = jnp.zeros_like(seg)
    np.testing.assert_array_equal(layers.prefix_lm_mask(seg, zeros), got)  # No prefix: causal.
    bias = np.asarray(layers.mask_to_bias(jnp.asarray(got)))
    assert bias.dtype == np.float32 and np.isfinite(bias).all()
    assert (bias[got] == 0).all() and (bias[~got] <= -1e9).all()


@pytest.mark.parametrize("mlp", ["gelu", "relu", "swiglu", "geglu"])
def test_mlp_matches_numpy(mlp):
    cfg = dataclasses.replace(CFG, mlp=mlp, use_bias=mlp in ("gelu", "relu"))
    x = np.random.default_rng(4).normal(size=(2, 3, cfg.d_model)).astype(np.float32)
    module = layers.Mlp(cfg)
    variables = jax.jit(module.init)(jax.random.key(0), x)
    variables = jax.tree.map(lambda a: a + 0.1 * jnp.ones_like(a), variables)
    p = _np_params(variables)

    def dense(name, h):
        return h @ p[name]["kernel"] + p[name].get("bias", 0.0)

    act = {"gelu": _np_gelu_tanh, "relu": lambda h: np.maximum(h, 0)}
    act |= {"geglu": _np_gelu_tanh, "swiglu": lambda h: h / (1 + np.exp(-h))}
    if mlp in ("swiglu", "geglu"):
        assert set(p) == {"wi_0", "wi_1", "wo"}
        hidden = act[mlp](dense("wi_0", x)) * dense("wi_1", x)
    else:
        assert set(p) == {"wi", "wo"}
        hidden = act[mlp](dense("wi", x))
    np.testing.assert_allclose(jax.jit(module.apply)(variables, x), dense("wo", hidden), atol=1e-5)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_norm_matches_numpy(norm):
    cfg = dataclasses.replace(CFG, norm=norm)
    x = np.random.default_rng(5).normal(2.0, 3.0, size=(2, 3, cfg.d_model)).astype(np.float32)
    module = layers.make_norm(cfg, "norm")
    variables = jax.jit(module.init)(jax.random.key(0), x)
    p = _np_params(variables)
    np.testing.assert_array_equal(p["scale"], 1.0)
    if norm == "layernorm":
        np.testing.assert_array_equal(p["bias"], 0.0)
        want = _np_layernorm(x, cfg.norm_eps)
    else:
        assert set(p) == {"scale"}
        want = x / np.sqrt((x**2).mean(-1, keepdims=True) + cfg.norm_eps)
    np.testing.assert_allclose(jax.jit(module.apply)(variables, x), want, atol=1e-5, rtol=1e-5)


def test_embed_lookup_and_attend():
    embed = layers.Embed(10, 8, dtype=jnp.bfloat16)
    variables = jax.jit(embed.init)(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    table = np.asarray(nn.meta.unbox(variables)["params"]["embedding"])
    ids = jnp.asarray([[3, 7]])
    np.testing.assert_allclose(
        np.asarray(embed.apply(variables, ids), np.float32), table[[3, 7]][None], rtol=1e-2
    )
    x = np.random.default_rng(6).normal(size=(1, 2, 8)).astype(np.float32)
    logits = embed.apply(variables, x, method=layers.Embed.attend)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, x @ table.T, atol=1e-3, rtol=2e-2)


@functools.cache
def _init_block(cfg: TransformerConfig):
    x = jnp.zeros((1, 2, cfg.d_model))
    return jax.jit(layers.TransformerBlock(cfg).init)(jax.random.key(0), x, jnp.zeros((1, 1, 2, 2)))


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_transformer_block_matches_numpy(norm_position):
    cfg = dataclasses.replace(CFG, norm_position=norm_position)
    rng = np.random.default_rng(8)
    x = rng.normal(size=(2, 6, cfg.d_model)).astype(np.float32)
    seg = np.array([[1, 1, 1, 2, 2, 0], [1] * 6])
    mask = np.asarray(layers.padding_mask(jnp.asarray(seg), jnp.asarray(seg)))
    bias = layers.mask_to_bias(mask)
    block = layers.TransformerBlock(cfg)
    names = set(jax.eval_shape(block.init, jax.random.key(0), x, bias)["params"])
    assert names == {"attn", "mlp", f"{norm_position}_attn_norm", f"{norm_position}_mlp_norm"}
    # One (slow) init for both orders: the shapes agree, only the norms' names differ.
    variables = _init_block(CFG)
    params = {k.replace("pre_", f"{norm_position}_"): v for k, v in variables["params"].items()}
    # Norm scales of 1.1 and biases of 0.1 everywhere, so every parameter's use shows up.
    variables = jax.tree.map(lambda a: a + 0.1 * jnp.ones_like(a), {"params": params})
    p = _np_params(variables)

    def norm(name, h):
        return _np_layernorm(h, cfg.norm_eps, p[name]["scale"], p[name]["bias"])

    def attn(h):
        return _np_attention(p["attn"], h, h, mask, cfg.n_heads, cfg.n_kv_heads)

    def mlp(h):
        hidden = _np_gelu_tanh(h @ p["mlp"]["wi"]["kernel"] + p["mlp"]["wi"]["bias"])
        return hidden @ p["mlp"]["wo"]["kernel"] + p["mlp"]["wo"]["bias"]

    if norm_position == "pre":
        h = x + attn(norm("pre_attn_norm", x))
        want = h + mlp(norm("pre_mlp_norm", h))
    else:
        h = norm("post_attn_norm", x + attn(x))
        want = norm("post_mlp_norm", h + mlp(h))
    np.testing.assert_allclose(jax.jit(block.apply)(variables, x, bias), want, atol=1e-4)


@pytest.mark.parametrize(
    "change",
    [
        {"n_heads": 5},
        {"n_kv_heads": 3},
        {"position": "alibi"},
        {"norm": "batchnorm"},
        {"mlp": "tanh"},
        {"dropout": 1.0},
        {"position": "rope", "d_model": 36, "n_heads": 4, "n_kv_heads": 4},
        {"norm_position": "sandwich"},
        {"type_vocab_size": -1},
        {"n_decoder_layers": -1},
        {"relative_buckets": 2},
        {"relative_max_distance": 16},
    ],
)
def test_config_rejects_invalid_values(change):
    with pytest.raises(KilnError, match="model\\.(" + "|".join(change) + ")="):
        dataclasses.replace(CFG, **change)
    assert CFG.head_dim == 8
