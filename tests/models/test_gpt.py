"""Tests for kiln.models.gpt: causality, packing, padding, parameter tree, numerics."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import model_checks
import numpy as np
import pytest

from kiln.models.gpt import GPT, count_params
from kiln.models.layers import TransformerConfig

GPT2 = TransformerConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64, max_len=16
)
MODERN = dataclasses.replace(
    GPT2,
    position="rope",
    norm="rmsnorm",
    mlp="swiglu",
    use_bias=False,
    n_kv_heads=2,
    tie_embeddings=False,
)
STYLES = pytest.mark.parametrize("cfg", [GPT2, MODERN], ids=["gpt2", "modern"])
ALLOWED_NAMES = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "max_len"}

# Row 0 packs two documents (5 and 7 tokens) and 4 pads; row 1 is a single document.
SEG = np.array([[1] * 5 + [2] * 7 + [0] * 4, [1] * 16])
POS = np.array([list(range(5)) + list(range(7)) + [0] * 4, list(range(16))])
TOKENS = np.random.default_rng(0).integers(1, 64, size=(2, 16))


@functools.cache
def _init(cfg: TransformerConfig):
    return jax.jit(GPT(cfg).init)(jax.random.key(0), jnp.asarray(TOKENS))


@functools.cache
def _apply(cfg: TransformerConfig):
    return jax.jit(GPT(cfg).apply, static_argnames="deterministic")


def _params(cfg):
    return nn.meta.unbox(_init(cfg))


def _input_dependence(cfg, tokens, seg, pos, prefix=None):
    """|d out[b, t] / d x[b', s]|, summed over D, where x is the token-embedding output."""
    model, params = GPT(cfg), _params(cfg)
    proj_V = jax.random.normal(jax.random.key(1), (cfg.vocab_size,))

    def out_BL(delta_BLD):
        def add_delta(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            is_lookup = context.module.name == "token_embed" and context.method_name == "__call__"
            return out + delta_BLD if is_lookup else out

        with nn.intercept_methods(add_delta):
            return model.apply(params, tokens, seg, pos, prefix) @ proj_V

    jac = jax.jit(jax.jacrev(out_BL))(jnp.zeros(tokens.shape + (cfg.d_model,)))
    return np.abs(np.asarray(jac)).sum(-1)  # [B, L, B, L]


@STYLES
def test_causal_and_no_attention_across_documents(cfg):
    dep = _input_dependence(cfg, TOKENS, SEG, POS)
    b, length = TOKENS.shape
    allowed = np.zeros((b, length, b, length), bool)
    for i in range(b):
        for t in range(length):
            allowed[i, t, i, : t + 1] = SEG[i, : t + 1] == SEG[i, t]
    np.testing.assert_array_equal(dep[~allowed], 0.0)  # Future, other documents, other rows.
    assert (dep[allowed] > 0).all()  # Every earlier token of the same document matters.
    assert allowed[0, 11, 0, 5] and not allowed[0, 11, 0, 4]  # Doc 2 starts at position 5.


@pytest.mark.parametrize("cfg", [MODERN], ids=["modern"])  # The mask is style-independent.
def test_prefix_lm_is_bidirectional_in_the_prefix_only(cfg):
    prefix = np.zeros_like(SEG)
    prefix[0, :3], prefix[0, 5:7], prefix[1, :6] = 1, 1, 1  # Each document's first tokens.
    dep = _input_dependence(cfg, TOKENS, SEG, POS, prefix)
    b, length = TOKENS.shape
    allowed = np.zeros((b, length, b, length), bool)
    for i in range(b):
        for t in range(length):
            for s in range(length):
                allowed[i, t, i, s] = SEG[i, s] == SEG[i, t] and (s <= t or prefix[i, s] == 1)
    np.testing.assert_array_equal(dep[~allowed], 0.0)
    assert (dep[allowed] > 0).all()
    assert dep[0, 0, 0, 2] > 0 and dep[1, 1, 1, 5] > 0  # Prefix reads later prefix tokens...
    assert dep[1, 1, 1, 6] == 0 and dep[1, 7, 1, 8] == 0  # ...not the continuation, causal.
    assert dep[0, 5, 0, 6] > 0 and dep[0, 5, 0, 2] == 0  # Doc 2's prefix; not doc 1's.


def test_without_prefix_mask_the_model_is_causal(cfg=GPT2):
    apply, params = _apply(cfg), _params(cfg)
    causal = np.asarray(apply(params, TOKENS, SEG, POS))
    no_prefix = apply(params, TOKENS, SEG, POS, np.zeros_like(SEG))
    np.testing.assert_allclose(no_prefix, causal, rtol=0, atol=1e-6)
    all_prefix = np.asarray(apply(params, TOKENS, SEG, POS, np.ones_like(SEG)))
    assert not np.allclose(all_prefix[:, :-1], causal[:, :-1], atol=1e-4)  # The mask is used.


def test_post_ln_gpt_has_no_final_norm():
    cfg = dataclasses.replace(GPT2, norm_position="post")
    shapes = jax.eval_shape(GPT(cfg).init, jax.random.key(0), jnp.asarray(TOKENS))["params"]
    assert "final_norm" not in shapes
    assert set(shapes["block_0"]) == {"post_attn_norm", "attn", "post_mlp_norm", "mlp"}
    logits = jax.eval_shape(GPT(cfg).apply, {"params": shapes}, TOKENS, SEG, POS)
    assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == jnp.float32


@STYLES
def test_pad_tokens_do_not_change_outputs(cfg):
    model_checks.assert_pad_ids_do_not_change_outputs(_apply(cfg), _params(cfg), POS)


@STYLES
def test_packed_documents_match_documents_alone(cfg):
    apply, params = _apply(cfg), _params(cfg)
    packed = np.asarray(apply(params, TOKENS, SEG, POS))
    # Each document alone at the start of its own row; what follows it cannot be seen (causal).
    alone_tokens = np.zeros_like(TOKENS)
    alone_tokens[0, :5], alone_tokens[1, :7] = TOKENS[0, :5], TOKENS[0, 5:12]
    alone = np.asarray(apply(params, alone_tokens, np.ones_like(SEG), POS[1:].repeat(2, 0)))
    np.testing.assert_allclose(packed[0, :5], alone[0, :5], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(packed[0, 5:12], alone[1, :7], atol=1e-5, rtol=1e-5)


@STYLES
def test_position_shift(cfg):
    apply, params = _apply(cfg), _params(cfg)
    logits = np.asarray(apply(params, TOKENS, SEG, POS))
    shifted = np.asarray(apply(params, TOKENS, SEG, POS + 3))
    stretched = np.asarray(apply(params, TOKENS, SEG, POS * 2))
    assert not np.allclose(logits, stretched, atol=1e-4)  # Positions are used.
    if cfg.position == "rope":  # Only relative positions matter.
        np.testing.assert_allclose(shifted, logits, atol=1e-5, rtol=1e-5)
    else:
        assert not np.allclose(shifted, logits, atol=1e-4)


@STYLES
def test_parameter_tree_names_and_logical_axes(cfg):
    variables = _init(cfg)
    assert set(variables) == {"params"}
    top = set(variables["params"])
    want = {"token_embed", "block_0", "block_1", "final_norm"}
    want |= {"position_embed"} if cfg.position == "learned" else set()
    want |= set() if cfg.tie_embeddings else {"lm_head"}
    assert top == want
    leaves = jax.tree_util.tree_leaves_with_path(
        variables, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    for path, leaf in leaves:
        name = path[-1].key
        assert isinstance(leaf, nn.Partitioned), name
        assert name in {"kernel", "bias", "scale", "embedding"}, path
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= ALLOWED_NAMES, path
    specs = nn.get_partition_spec(variables)["params"]
    h, k, e, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    attn = variables["params"]["block_1"]["attn"]
    assert attn["query"]["kernel"].value.shape == (d, h, e)
    assert attn["key"]["kernel"].value.shape == (d, k, e)
    assert attn["value"]["kernel"].names == ("embed", "kv_heads", "head_dim")
    assert attn["out"]["kernel"].value.shape == (h, e, d)
    assert tuple(specs["token_embed"]["embedding"]) == ("vocab", "embed")
    if not cfg.tie_embeddings:
        assert tuple(specs["lm_head"]["kernel"]) == ("embed", "vocab")


def test_untying_adds_only_the_head():
    tied = jax.tree.map(np.shape, _params(GPT2))["params"]
    untied_cfg = dataclasses.replace(GPT2, tie_embeddings=False)
    untied = jax.eval_shape(GPT(untied_cfg).init, jax.random.key(0), jnp.asarray(TOKENS))
    untied = jax.tree.map(np.shape, nn.meta.unbox(untied))
    untied = dict(untied["params"])
    assert untied.pop("lm_head") == {"kernel": (GPT2.d_model, GPT2.vocab_size)}
    assert untied == tied


def test_count_params_matches_formula():
    v, d, f, n, max_len = GPT2.vocab_size, GPT2.d_model, GPT2.d_ff, GPT2.n_layers, GPT2.max_len
    attn = 4 * (d * d + d)  # q, k, v, o kernels and biases (MHA: kv width is d).
    mlp = d * f + f + f * d + d
    norms = 2 * 2 * d  # Two layernorms, scale and bias.
    want = v * d + max_len * d + n * (attn + mlp + norms) + 2 * d
    assert count_params(_init(GPT2)) == want  # Boxed.
    assert count_params(_params(GPT2)) == want  # Unboxed.
    assert count_params(jax.eval_shape(lambda: _params(GPT2))) == want  # Shapes only.


def test_initialisation_scales():
    cfg, p = GPT2, _params(GPT2)["params"]  # About 1000 samples per kernel: std within 10%.
    np.testing.assert_allclose(np.std(p["token_embed"]["embedding"]), 0.02, rtol=0.1)
    np.testing.assert_allclose(np.std(p["block_0"]["attn"]["query"]["kernel"]), 0.02, rtol=0.1)
    np.testing.assert_allclose(np.std(p["block_0"]["mlp"]["wi"]["kernel"]), 0.02, rtol=0.1)
    residual = 0.02 / np.sqrt(2 * cfg.n_layers)
    np.testing.assert_allclose(np.std(p["block_0"]["attn"]["out"]["kernel"]), residual, rtol=0.1)
    np.testing.assert_allclose(np.std(p["block_0"]["mlp"]["wo"]["kernel"]), residual, rtol=0.1)
    np.testing.assert_array_equal(p["block_0"]["mlp"]["wo"]["bias"], 0.0)
    np.testing.assert_array_equal(p["final_norm"]["scale"], 1.0)


@pytest.mark.parametrize("cfg", [MODERN], ids=["modern"])  # Eager runs are slow; one style.
def test_jit_matches_no_jit(cfg):
    params = _params(cfg)
    eager = GPT(cfg).apply(params, TOKENS, SEG, POS)
    jitted = _apply(cfg)(params, TOKENS, SEG, POS)
    assert eager.shape == (2, 16, cfg.vocab_size) and eager.dtype == jnp.float32
    np.testing.assert_allclose(eager, jitted, atol=1e-5, rtol=1e-5)


@STYLES
def test_bfloat16_compute(cfg):
    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    params = _params(cfg)
    apply = jax.jit(GPT(bf16).apply)
    logits = apply(params, TOKENS, SEG, POS)
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
    assert "bf16[2,16,4,8]" in str(jax.make_jaxpr(apply)(params, TOKENS, SEG, POS))  # Queries.
    np.testing.assert_allclose(logits, _apply(cfg)(params, TOKENS, SEG, POS), atol=0.05)


def test_param_dtype():
    cfg = dataclasses.replace(MODERN, param_dtype="bfloat16")
    shapes = jax.eval_shape(GPT(cfg).init, jax.random.key(0), jnp.asarray(TOKENS))
    assert {x.dtype for x in jax.tree.leaves(nn.meta.unbox(shapes))} == {jnp.dtype(jnp.bfloat16)}


def test_dropout_only_when_not_deterministic(cfg=GPT2):
    params = _params(cfg)
    apply = _apply(dataclasses.replace(cfg, dropout=0.2))

    def run(seed=None):
        rngs = None if seed is None else {"dropout": jax.random.key(seed)}
        return np.asarray(apply(params, TOKENS, SEG, POS, rngs=rngs, deterministic=seed is None))

    np.testing.assert_allclose(run(), _apply(cfg)(params, TOKENS, SEG, POS), atol=1e-6)
    np.testing.assert_array_equal(run(1), run(1))
    assert not np.allclose(run(1), run(2))
    assert not np.allclose(run(1), run())
