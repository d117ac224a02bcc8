"""Tests for kiln.models.blocks against plain NumPy references."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpy_refs
import pytest

from kiln.models import blocks, layers
from kiln.models.layers import TransformerConfig

CFG = TransformerConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=48, max_len=16
)
MODE = blocks.BlockMode()  # Deterministic, bidirectional, not decoding.


@functools.cache
def _init_block(cfg: TransformerConfig):
    x = jnp.zeros((1, 2, cfg.d_model))
    args = blocks.BlockArgs(bias=jnp.zeros((1, 1, 2, 2)))
    init = blocks.TransformerBlock(cfg).init
    return jax.jit(lambda key, x, args: init(key, x, args, MODE))(jax.random.key(0), x, args)


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_transformer_block_matches_numpy(norm_position):
    cfg = dataclasses.replace(CFG, norm_position=norm_position)
    rng = np.random.default_rng(8)
    x = rng.normal(size=(2, 6, cfg.d_model)).astype(np.float32)
    seg = np.array([[1, 1, 1, 2, 2, 0], [1] * 6])
    mask = np.asarray(layers.padding_mask(jnp.asarray(seg), jnp.asarray(seg)))
    args = blocks.BlockArgs(bias=layers.mask_to_bias(mask))
    block = blocks.TransformerBlock(cfg)
    names = set(jax.eval_shape(lambda: block.init(jax.random.key(0), x, args, MODE))["params"])
    assert names == {"attn", "mlp", f"{norm_position}_attn_norm", f"{norm_position}_mlp_norm"}
    # One (slow) init for both orders: the shapes agree, only the norms' names differ.
    variables = _init_block(CFG)
    params = {k.replace("pre_", f"{norm_position}_"): v for k, v in variables["params"].items()}
    # Norm scales of 1.1 and biases of 0.1 everywhere, so every parameter's use shows up.
    variables = jax.tree.map(lambda a: a + 0.1 * jnp.ones_like(a), {"params": params})
    p = numpy_refs.params(variables)

    def norm(name, h):
        return numpy_refs.layernorm(h, cfg.norm_eps, p[name]["scale"], p[name]["bias"])

    def attn(h):
        return numpy_refs.attention(p["attn"], h, h, mask, cfg.n_heads, cfg.n_kv_heads)

    def mlp(h):
        hidden = numpy_refs.gelu_tanh(h @ p["mlp"]["wi"]["kernel"] + p["mlp"]["wi"]["bias"])
        return hidden @ p["mlp"]["wo"]["kernel"] + p["mlp"]["wo"]["bias"]

    if norm_position == "pre":
        h = x + attn(norm("pre_attn_norm", x))
        want = h + mlp(norm("pre_mlp_norm", h))
    else:
        h = norm("post_attn_norm", x + attn(x))
        want = norm("post_mlp_norm", h + mlp(h))
    apply = jax.jit(lambda variables, x, args: block.apply(variables, x, args, MODE))
    np.testing.assert_allclose(apply(variables, x, args), want, atol=1e-4)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_rematerialized_block_is_the_same_function(remat):
    """`mode` stays static under nn.remat (dropout branches on it): the same output and
    gradients as the plain block, dropout masks included."""
    cfg = dataclasses.replace(CFG, dropout=0.1)
    x = np.random.default_rng(9).normal(size=(2, 6, cfg.d_model)).astype(np.float32)
    args = blocks.BlockArgs(bias=jnp.zeros((1, 1, 6, 6)))
    mode = blocks.BlockMode(deterministic=False)
    params = _init_block(CFG)["params"]

    @functools.partial(jax.jit, static_argnums=1)
    def loss_and_grads(params, block_class):
        def loss(params):
            out = block_class(cfg).apply(
                {"params": params}, x, args, mode, rngs={"dropout": jax.random.key(1)}
            )
            return jnp.sum(jnp.sin(out))

        return jax.value_and_grad(loss)(params)

    remat_class = blocks.rematerialized(
        blocks.TransformerBlock, dataclasses.replace(cfg, remat=remat)
    )
    assert remat_class is not blocks.TransformerBlock
    want = loss_and_grads(params, blocks.TransformerBlock)
    got = loss_and_grads(params, remat_class)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, want)
