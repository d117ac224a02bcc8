"""Tests for kiln.models.bert: bidirectionality, packing, padding, MLM head, parameter tree."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import model_checks
import numpy as np
import numpy_refs
import pytest

from kiln.models.bert import BERT
from kiln.models.gpt import count_params
from kiln.models.layers import TransformerConfig

# Classic BERT: post-LN, learned positions, layernorm, gelu, biases, token types.
POST = TransformerConfig(
    vocab_size=64,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=4,
    d_ff=64,
    max_len=16,
    norm_position="post",
    type_vocab_size=2,
)
# Pre-LN with modern layers and no token types.
PRE = dataclasses.replace(
    POST,
    norm_position="pre",
    type_vocab_size=0,
    position="rope",
    norm="rmsnorm",
    mlp="swiglu",
    use_bias=False,
    n_kv_heads=2,
)
STYLES = pytest.mark.parametrize("cfg", [POST, PRE], ids=["post_ln", "pre_ln"])
# HF BERT's exact (erf) GELU in the MLP and the MLM head; layernorm epsilon as HF BERT's.
EXACT = dataclasses.replace(POST, gelu_approximate=False, norm_eps=1e-12)
ALLOWED_NAMES = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "max_len", "type_vocab"}

# Row 0 packs two documents (5 and 7 tokens) and 4 pads; row 1 is a single document.
SEG = np.array([[1] * 5 + [2] * 7 + [0] * 4, [1] * 16])
POS = np.array([list(range(5)) + list(range(7)) + [0] * 4, list(range(16))])
TYPES = np.array([[0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0], [0] * 8 + [1] * 8])
TOKENS = np.random.default_rng(0).integers(1, 64, size=(2, 16))


@functools.cache
def _init(cfg: TransformerConfig):
    # The trainer's call: token ids only, by keyword.
    return jax.jit(BERT(cfg).init)(jax.random.key(0), inputs=jnp.zeros((1, 16), jnp.int32))


@functools.cache
def _apply(cfg: TransformerConfig, method: str = "__call__"):
    return jax.jit(functools.partial(BERT(cfg).apply, method=method))


def _params(cfg):
    return nn.meta.unbox(_init(cfg))


def _input_dependence(cfg, tokens, seg, pos):
    """|d out[b, t] / d x[b', s]|, summed over D, where x is the token-embedding output."""
    model, params = BERT(cfg), _params(cfg)
    proj_V = jax.random.normal(jax.random.key(1), (cfg.vocab_size,))

    def out_BL(delta_BLD):
        def add_delta(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            is_lookup = context.module.name == "token_embed" and context.method_name == "__call__"
            return out + delta_BLD if is_lookup else out

        with nn.intercept_methods(add_delta):
            return model.apply(params, tokens, seg, pos) @ proj_V

    jac = jax.jit(jax.jacrev(out_BL))(jnp.zeros(tokens.shape + (cfg.d_model,)))
    return np.abs(np.asarray(jac)).sum(-1)  # [B, L, B, L]


@STYLES
def test_bidirectional_within_documents_only(cfg):
    dep = _input_dependence(cfg, TOKENS, SEG, POS)
    b, length = TOKENS.shape
    allowed = np.zeros((b, length, b, length), bool)
    for i in range(b):
        allowed[i, :, i, :] = SEG[i][:, None] == SEG[i][None, :]
    np.testing.assert_array_equal(dep[~allowed], 0.0)  # Other documents, padding, other rows.
    assert (dep[allowed] > 0).all()  # Every token of the same document, before and after.
    assert dep[0, 7, 0, 5] > 0 and dep[0, 7, 0, 11] > 0 and dep[0, 7, 0, 4] == 0


@STYLES
def test_pad_tokens_do_not_change_outputs(cfg):
    model_checks.assert_pad_ids_do_not_change_outputs(_apply(cfg), _params(cfg), POS)


@STYLES
def test_packed_documents_match_documents_alone(cfg):
    apply, params = _apply(cfg), _params(cfg)
    packed = np.asarray(apply(params, TOKENS, SEG, POS))
    # Each document alone at the start of its own row, the rest padding.
    alone_seg = np.zeros_like(SEG)
    alone_seg[0, :5], alone_seg[1, :7] = 1, 1
    alone_tokens = np.zeros_like(TOKENS)
    alone_tokens[0, :5], alone_tokens[1, :7] = TOKENS[0, :5], TOKENS[0, 5:12]
    alone = np.asarray(apply(params, alone_tokens, alone_seg, POS[1:].repeat(2, 0)))
    np.testing.assert_allclose(packed[0, :5], alone[0, :5], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(packed[0, 5:12], alone[1, :7], atol=1e-5, rtol=1e-5)


def _np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


@STYLES
def test_predicting_at_chosen_positions_equals_every_position(cfg):
    """predict_positions runs the head at those positions only (repeats and padding at 0
    included): the full logits there."""
    apply, params = _apply(cfg), _params(cfg)
    full = np.asarray(apply(params, TOKENS, SEG, POS))
    chosen = np.array([[0, 3, 7, 11, 0], [15, 2, 2, 9, 4]], np.int32)
    sparse = np.asarray(apply(params, TOKENS, SEG, POS, None, chosen))
    assert sparse.shape == (2, 5, cfg.vocab_size)
    want = np.take_along_axis(full, chosen[:, :, None], axis=1)
    np.testing.assert_allclose(sparse, want, rtol=1e-5, atol=1e-5)


def _np_mlm_head(cfg, p, x, gelu):
    """The MLM head in NumPy: dense, gelu, norm (returned), tied output plus bias (returned)."""
    head = p["mlm_head"]
    h = gelu(x @ head["mlm_transform"]["kernel"] + head["mlm_transform"].get("bias", 0))
    norm = head["mlm_norm"]
    if cfg.norm == "layernorm":
        h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + cfg.norm_eps)
        h = h * norm["scale"] + norm["bias"]
    else:
        h = h / np.sqrt((h**2).mean(-1, keepdims=True) + cfg.norm_eps) * norm["scale"]
    return h, h @ p["token_embed"]["embedding"].T + head["bias"]


# EXACT's transform kernel is scaled up so its pre-activations reach |x| ~ 2, where the exact
# and tanh GELUs differ by ~2e-4 after the norm (at init by ~1e-5 in the logits, below atol).
@pytest.mark.parametrize(
    "cfg, scale", [(POST, 1.0), (PRE, 1.0), (EXACT, 20.0)], ids=["post_ln", "pre_ln", "exact"]
)
def test_mlm_head_is_tied_to_the_token_embedding(cfg, scale):
    variables = jax.tree.map(lambda a: a + 0.1 * jnp.ones_like(a), _params(cfg))  # Biases != 0.
    transform = variables["params"]["mlm_head"]["mlm_transform"]
    transform["kernel"] = transform["kernel"] * scale
    p = jax.tree.map(np.asarray, variables["params"])
    head = p["mlm_head"]
    assert set(head) == {"mlm_transform", "mlm_norm", "bias"}  # No untied output matrix.
    assert head["bias"].shape == (cfg.vocab_size,)
    x = np.asarray(_apply(cfg, "encode")(variables, TOKENS, SEG, POS))
    assert x.shape == (2, 16, cfg.d_model)
    gelu = _np_gelu_tanh if cfg.gelu_approximate else numpy_refs.gelu_erf
    h, want = _np_mlm_head(cfg, p, x, gelu)
    logits = _apply(cfg)(variables, TOKENS, SEG, POS)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 16, cfg.vocab_size)
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=1e-4)
    if not cfg.gelu_approximate:  # The head's normed hidden states: erf, not tanh.
        got = np.asarray(BERT(cfg).apply(variables, TOKENS, SEG, POS, head_inputs=True).x_BLD)
        np.testing.assert_allclose(got, h, atol=1e-5, rtol=1e-5)
        assert np.abs(_np_mlm_head(cfg, p, x, _np_gelu_tanh)[0] - got).max() > 1e-4


def test_token_types_change_the_output(cfg=POST):
    apply, params = _apply(cfg), _params(cfg)
    assert params["params"]["type_embed"]["embedding"].shape == (2, cfg.d_model)
    default = np.asarray(apply(params, TOKENS, SEG, POS))
    zeros = apply(params, TOKENS, SEG, POS, np.zeros_like(TYPES))
    np.testing.assert_allclose(zeros, default, atol=1e-6)
    typed = np.asarray(apply(params, TOKENS, SEG, POS, TYPES))
    assert not np.allclose(typed, default, atol=1e-4)
    # Without a type table (PRE) the ids are ignored.
    pre = _apply(PRE)(_params(PRE), TOKENS, SEG, POS, TYPES)
    np.testing.assert_allclose(pre, _apply(PRE)(_params(PRE), TOKENS, SEG, POS), atol=1e-6)


@STYLES
def test_parameter_tree_names_and_logical_axes(cfg):
    variables = _init(cfg)
    assert set(variables) == {"params"}
    want = {"token_embed", "mlm_head"} | {f"block_{i}" for i in range(cfg.n_layers)}
    want |= {"position_embed"} if cfg.position == "learned" else set()
    want |= {"type_embed"} if cfg.type_vocab_size else set()
    want |= {"embed_norm"} if cfg.norm_position == "post" else {"final_norm"}
    assert set(variables["params"]) == want
    norms = {f"{cfg.norm_position}_attn_norm", f"{cfg.norm_position}_mlp_norm"}
    assert set(variables["params"]["block_0"]) == {"attn", "mlp"} | norms
    leaves = jax.tree_util.tree_leaves_with_path(
        variables, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    for path, leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), path
        assert path[-1].key in {"kernel", "bias", "scale", "embedding"}, path
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= ALLOWED_NAMES, path
    if cfg.type_vocab_size:
        assert variables["params"]["type_embed"]["embedding"].names == ("type_vocab", "embed")


def test_count_params_matches_formula(cfg=POST):
    v, d, f, n, max_len = cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.max_len
    block = 4 * (d * d + d) + (d * f + f + f * d + d) + 2 * 2 * d  # attn, mlp, two norms.
    embeddings = v * d + max_len * d + 2 * d + 2 * d  # Tokens, positions, types, embed_norm.
    head = d * d + d + 2 * d + v  # Transform, norm, output bias.
    assert count_params(_init(cfg)) == embeddings + n * block + head


def test_task_models_reuse_the_encoder_tree(cfg=PRE):
    class Encoder(BERT):
        def __call__(self, inputs, **kwargs):
            return self.encode(inputs, **kwargs)

    tokens = jnp.zeros((1, 16), jnp.int32)
    shapes = jax.eval_shape(Encoder(cfg).init, jax.random.key(0), inputs=tokens)["params"]
    full = dict(jax.eval_shape(BERT(cfg).init, jax.random.key(0), inputs=tokens)["params"])
    full.pop("mlm_head")
    assert jax.tree.map(np.shape, shapes) == jax.tree.map(np.shape, full)


def test_dropout_only_when_not_deterministic(cfg=POST):
    params = _params(cfg)
    apply = jax.jit(
        BERT(dataclasses.replace(cfg, dropout=0.2)).apply, static_argnames="deterministic"
    )

    def run(seed):
        rngs = {"dropout": jax.random.key(seed)}
        return np.asarray(apply(params, TOKENS, SEG, POS, rngs=rngs, deterministic=False))

    np.testing.assert_array_equal(run(1), run(1))
    assert not np.allclose(run(1), run(2))
    assert not np.allclose(run(1), _apply(cfg)(params, TOKENS, SEG, POS))  # Deterministic.
