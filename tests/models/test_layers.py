"""Tests for kiln.models.layers against plain NumPy references."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpy_refs
import pytest

from kiln.errors import KilnError
from kiln.models import layers
from kiln.models.layers import TransformerConfig

CFG = TransformerConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=48, max_len=16
)


def test_rope_matches_numpy():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 6, 3, 8)).astype(np.float32)
    pos = rng.integers(0, 100, size=(2, 6))
    out = layers.apply_rope(jnp.asarray(x), jnp.asarray(pos), 10000.0)
    np.testing.assert_allclose(out, numpy_refs.rope(x, pos, 10000.0), atol=1e-4, rtol=1e-5)
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
    p = numpy_refs.params(variables)

    def dense(name, h):
        return h @ p[name]["kernel"] + p[name].get("bias", 0.0)

    act = {"gelu": numpy_refs.gelu_tanh, "relu": lambda h: np.maximum(h, 0)}
    act |= {"geglu": numpy_refs.gelu_tanh, "swiglu": lambda h: h / (1 + np.exp(-h))}
    if mlp in ("swiglu", "geglu"):
        assert set(p) == {"wi_0", "wi_1", "wo"}
        hidden = act[mlp](dense("wi_0", x)) * dense("wi_1", x)
    else:
        assert set(p) == {"wi", "wo"}
        hidden = act[mlp](dense("wi", x))
    np.testing.assert_allclose(jax.jit(module.apply)(variables, x), dense("wo", hidden), atol=1e-5)


@pytest.mark.parametrize("mlp", ["gelu", "geglu"])
def test_exact_gelu_mlp_matches_numpy(mlp):
    cfg = dataclasses.replace(CFG, mlp=mlp, gelu_approximate=False)
    x = np.random.default_rng(4).normal(size=(2, 3, cfg.d_model)).astype(np.float32)
    variables = jax.jit(layers.Mlp(cfg).init)(jax.random.key(0), x)
    variables = jax.tree.map(lambda a: a * 30 + 0.1, variables)  # Pre-activations of order 1.
    p = numpy_refs.params(variables)

    def dense(name, h):
        return h @ p[name]["kernel"] + p[name]["bias"]

    if mlp == "geglu":
        hidden = numpy_refs.gelu_erf(dense("wi_0", x)) * dense("wi_1", x)
    else:
        hidden = numpy_refs.gelu_erf(dense("wi", x))
    exact = jax.jit(layers.Mlp(cfg).apply)(variables, x)
    np.testing.assert_allclose(exact, dense("wo", hidden), atol=1e-5, rtol=1e-5)
    tanh = jax.jit(layers.Mlp(dataclasses.replace(cfg, gelu_approximate=True)).apply)
    assert np.abs(tanh(variables, x) - exact).max() > 1e-4  # The two GELUs differ here.


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_norm_matches_numpy(norm):
    cfg = dataclasses.replace(CFG, norm=norm)
    x = np.random.default_rng(5).normal(2.0, 3.0, size=(2, 3, cfg.d_model)).astype(np.float32)
    module = layers.make_norm(cfg, "norm")
    variables = jax.jit(module.init)(jax.random.key(0), x)
    p = numpy_refs.params(variables)
    np.testing.assert_array_equal(p["scale"], 1.0)
    if norm == "layernorm":
        np.testing.assert_array_equal(p["bias"], 0.0)
        want = numpy_refs.layernorm(x, cfg.norm_eps)
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


@pytest.mark.parametrize(
    "change",
    [
        {"n_heads": 5},
        {"n_kv_heads": 3},
        {"position": "alibi"},
        {"norm": "batchnorm"},
        {"mlp": "tanh"},
        {"dropout": 1.0},
        {"init_std": 0.0},
        {"position": "rope", "d_model": 36, "n_heads": 4, "n_kv_heads": 4},
        {"norm_position": "sandwich"},
        {"type_vocab_size": -1},
        {"n_decoder_layers": -1},
        {"relative_buckets": 2},
        {"relative_max_distance": 16},
        {"d_ff": 0},
        {"vocab_size": -1},
        {"dtype": "float64"},
        {"param_dtype": "float16"},
        {"remat": "some"},
        {"head_dim": -1},
        {"position": "rope", "head_dim": 7},
    ],
)
def test_config_rejects_invalid_values(change):
    with pytest.raises(KilnError, match="model\\.(" + "|".join(change) + ")="):
        dataclasses.replace(CFG, **change)
    assert CFG.head_dim == 8


def test_head_dim_defaults_to_d_model_over_n_heads_and_may_be_set():
    assert CFG.head_dim == 8 and not CFG.head_dim_given
    # replace derives it again from the new sizes unless it was set.
    assert dataclasses.replace(CFG, d_model=48).head_dim == 12
    wide = dataclasses.replace(CFG, n_heads=6, n_kv_heads=3, head_dim=20)  # 6 * 20 != 32.
    assert wide.head_dim == 20 and wide.head_dim_given
    assert dataclasses.replace(wide, d_model=48).head_dim == 20
    assert dataclasses.replace(CFG, head_dim=8) == CFG  # The same architecture.
    with pytest.raises(KilnError, match="model\\.d_model="):
        dataclasses.replace(wide, head_dim=0)  # 32 % 6 again.


def test_init_std_sets_every_dense_kernel_and_leaves_embeddings_at_0_02():
    """Empirical stds of a wide BERT classifier's parameters at init: kernels at init_std,
    output projections at init_std / sqrt(2 * n_layers), embeddings at 0.02."""
    from kiln import models

    wide = dataclasses.replace(CFG, vocab_size=512, d_model=256, d_ff=512, init_std=0.1)
    model = models.FAMILIES["bert"].classifier(wide, num_classes=64, pooling="mean")
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])
    mlm = models.FAMILIES["bert"].module(wide).init(jax.random.PRNGKey(1), tokens)
    params["mlm_head"] = nn.meta.unbox(mlm["params"]["mlm_head"])
    out_std = 0.1 / np.sqrt(2 * wide.n_layers)
    expected = {
        ("block_0", "attn", "query", "kernel"): 0.1,
        ("block_1", "attn", "value", "kernel"): 0.1,
        ("block_0", "attn", "out", "kernel"): out_std,
        ("block_0", "mlp", "wi", "kernel"): 0.1,
        ("block_1", "mlp", "wo", "kernel"): out_std,
        ("pooler", "kernel"): 0.1,
        ("classifier", "kernel"): 0.1,
        ("mlm_head", "mlm_transform", "kernel"): 0.1,
        ("token_embed", "embedding"): 0.02,
        ("position_embed", "embedding"): 0.02,
    }
    for path, std in expected.items():
        leaf = params
        for key in path:
            leaf = leaf[key]
        assert np.std(np.asarray(leaf)) == pytest.approx(std, rel=0.05), path
