"""Tests for kiln.models.t5: relative buckets, masking by gradients, packing, tree, numerics."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kiln.errors import KilnError
from kiln.models.layers import TransformerConfig
from kiln.models.t5 import T5, relative_position_bucket

# T5 v1.1 as the experiment sets it; small relative tables so short rows reach the log buckets.
V11 = TransformerConfig(
    vocab_size=64,
    d_model=32,
    n_layers=1,
    n_heads=4,
    n_kv_heads=2,
    d_ff=48,
    max_len=16,
    position="none",
    norm="rmsnorm",
    mlp="geglu",
    use_bias=False,
    tie_embeddings=False,
    scale_attention=False,
    n_decoder_layers=2,
    relative_buckets=8,
    relative_max_distance=16,
)
# Tied embeddings as in the original T5, MHA, scaled logits, decoder as deep as the encoder.
# Dropout on: the tests run deterministic, so they also check that this turns all dropout off.
TIED = dataclasses.replace(
    V11,
    mlp="relu",
    n_kv_heads=4,
    tie_embeddings=True,
    scale_attention=True,
    n_decoder_layers=0,
    dropout=0.2,
)
STYLES = pytest.mark.parametrize("cfg", [V11, TIED], ids=["v11", "tied"])
# T5's d_kv apart from d_model / n_heads (as in t5-3b): 4 heads of 12 over d_model 32.
WIDE = dataclasses.replace(V11, head_dim=12)
WITH_WIDE = pytest.mark.parametrize("cfg", [V11, TIED, WIDE], ids=["v11", "tied", "d_kv"])
ALLOWED_NAMES = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "max_len"}
ALLOWED_NAMES |= {"relpos_buckets"}

# Encoder length 12, decoder length 8 (different, so a test can tell the two lookups apart).
# Row 0 packs two examples on both sides with positions restarting, then pads; row 1 has one
# example with encoder padding and no decoder padding.
ENC_SEG = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 9 + [0] * 3])
ENC_POS = np.array([[*range(5), *range(4), 0, 0, 0], [*range(9), 0, 0, 0]])
DEC_SEG = np.array([[1] * 4 + [2] * 3 + [0], [1] * 8])
DEC_POS = np.array([[*range(4), *range(3), 0], [*range(8)]])
_rng = np.random.default_rng(0)
BATCH = {
    "encoder_inputs": _rng.integers(1, 64, size=ENC_SEG.shape),
    "decoder_inputs": _rng.integers(1, 64, size=DEC_SEG.shape),
    "encoder_segment_ids": ENC_SEG,
    "decoder_segment_ids": DEC_SEG,
    "encoder_positions": ENC_POS,
    "decoder_positions": DEC_POS,
}
ENCODER_KEYS = ("encoder_inputs", "encoder_segment_ids", "encoder_positions")


def _key(seed: int) -> jax.Array:
    # XLA compiles threefry slowly on CPU (init and dropout took 5-10x longer); the generator
    # is irrelevant to these tests.
    return jax.random.key(seed, impl="unsafe_rbg")


@functools.cache
def _init(cfg: TransformerConfig):
    # As the trainer does: keyword inputs of one row.
    zeros = jnp.zeros((1, 12), jnp.int32)
    return jax.jit(T5(cfg).init)(_key(0), encoder_inputs=zeros, decoder_inputs=zeros)


@functools.cache
def _apply(cfg: TransformerConfig, method: str = "__call__"):
    return jax.jit(functools.partial(T5(cfg).apply, method=method), static_argnames="deterministic")


def _params(cfg):
    return nn.meta.unbox(_init(cfg))


def _logits(cfg, batch=None):
    return np.asarray(_apply(cfg)(_params(cfg), **(BATCH if batch is None else batch)))


def _with_tables(params, fn):
    """A copy of params with each stack's relative bias table replaced by fn(stack, table)."""
    params = jax.tree.map(lambda x: x, params)  # New dicts, same arrays.
    for stack in ("encoder", "decoder"):
        relpos = params["params"][stack]["relpos_bias"]
        relpos["embedding"] = fn(stack, relpos["embedding"])
    return params


@functools.cache
def _dependence(cfg: TransformerConfig, method: str = "__call__") -> dict[str, np.ndarray]:
    """|d out[b, t] / d x[b', s]| summed over D, for x the token embedding of each side.

    out is the model's logits (or the encoder output for method="encode"), randomly projected.
    Returns {"encoder_inputs": [B, T, B, S], "decoder_inputs": [B, T, B, L]} (decoder only for
    method="__call__"), T the output length.
    """
    model, params = T5(cfg), _params(cfg)
    batch = {k: BATCH[k] for k in ENCODER_KEYS} if method == "encode" else BATCH
    sides = [k for k in ("encoder_inputs", "decoder_inputs") if k in batch]
    width = cfg.d_model if method == "encode" else cfg.vocab_size
    proj = jax.random.normal(jax.random.key(1), (width,))

    def out(deltas):
        def add_delta(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            if context.module.name == "token_embed" and context.method_name == "__call__":
                # The sides have different lengths, so the ids' shape tells which this is.
                for side in sides:
                    y = y + deltas[side] if args[0].shape == BATCH[side].shape else y
            return y

        with nn.intercept_methods(add_delta):
            return model.apply(params, **batch, method=method) @ proj

    deltas = {side: jnp.zeros(BATCH[side].shape + (cfg.d_model,)) for side in sides}
    jac = jax.jit(jax.jacrev(out))(deltas)
    return {side: np.abs(np.asarray(jac[side])).sum(-1) for side in sides}


def test_relative_position_bucket_table():
    rel = np.array([-200, -128, -64, -20, -9, -8, -7, -1, 0, 1, 7, 8, 9, 20, 64, 128, 200])
    # Bidirectional: 32 buckets -> 16 per direction, keys after the query (rel > 0) add 16.
    # Distance d = |rel|; d < 8 (= 16 / 2) is exact; else 8 + floor(8 * ln(d/8) / ln(128/8)),
    # capped at 15:
    #   d=8:   8 + floor(8 * 0)                                    = 8
    #   d=9:   8 + floor(8 * ln(1.125)/ln(16) = 8 * 0.1178/2.7726 = 0.34) = 8
    #   d=20:  8 + floor(8 * ln(2.5)/ln(16)   = 8 * 0.9163/2.7726 = 2.64) = 10
    #   d=64:  8 + floor(8 * ln(8)/ln(16)     = 8 * 3/4           = 6)    = 14
    #   d=128: 8 + floor(8 * ln(16)/ln(16)    = 8)                 = 16 -> capped 15
    #   d=200: 8 + floor(8 * ln(25)/ln(16)    = 8 * 3.2189/2.7726 = 9.29) = 17 -> capped 15
    bidirectional = [15, 15, 14, 10, 8, 8, 7, 1, 0, 17, 23, 24, 24, 26, 30, 31, 31]
    # Unidirectional: all 32 buckets for keys at or before the query (d = -rel); keys after the
    # query share bucket 0. d < 16 is exact; else 16 + floor(16 * ln(d/16) / ln(128/16)),
    # capped at 31:
    #   d=20:  16 + floor(16 * ln(1.25)/ln(8) = 16 * 0.2231/2.0794 = 1.72)  = 17
    #   d=64:  16 + floor(16 * ln(4)/ln(8)    = 16 * 2/3           = 10.67) = 26
    #   d=128: 16 + floor(16 * ln(8)/ln(8)    = 16)                 = 32 -> capped 31
    #   d=200: 16 + floor(16 * ln(12.5)/ln(8) = 16 * 2.5257/2.0794 = 19.43) = 35 -> capped 31
    unidirectional = [31, 31, 26, 17, 9, 8, 7, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    got = relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    np.testing.assert_array_equal(got, bidirectional)
    got = relative_position_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128)
    np.testing.assert_array_equal(got, unidirectional)
    # Any shape, under jit.
    rel_BLS = jnp.asarray(rel).reshape(1, 1, -1)
    got = jax.jit(relative_position_bucket, static_argnums=(1, 2, 3))(rel_BLS, True, 32, 128)
    np.testing.assert_array_equal(got[0, 0], bidirectional)


def test_decoder_is_causal_within_each_example(cfg=V11):
    dep = _dependence(cfg)["decoder_inputs"]
    b, length = DEC_SEG.shape
    allowed = np.zeros((b, length, b, length), bool)
    for i in range(b):
        for t in range(length):
            allowed[i, t, i, : t + 1] = DEC_SEG[i, : t + 1] == DEC_SEG[i, t]
    np.testing.assert_array_equal(dep[~allowed], 0.0)  # Future, other examples, other rows.
    assert (dep[allowed] > 0).all()  # Every earlier target of the same example matters.
    assert allowed[1, 7, 1, :].all() and not allowed[1, 3, 1, 4:].any()


def test_cross_attention_sees_all_of_its_example_and_no_padding(cfg=V11):
    dep = _dependence(cfg)["encoder_inputs"]  # [B, L, B, S]
    allowed = np.zeros(dep.shape, bool)
    for i in range(len(DEC_SEG)):
        allowed[i, :, i, :] = DEC_SEG[i][:, None] == ENC_SEG[i][None, :]
    np.testing.assert_array_equal(dep[~allowed], 0.0)
    assert (dep[allowed] > 0).all()
    # Spelled out for the non-pad targets: every non-pad encoder token matters, no pad does.
    real = DEC_SEG[1] != 0
    assert (dep[1, real][:, 1, :9] > 0).all()
    np.testing.assert_array_equal(dep[1, real][:, 1, 9:], 0.0)


@STYLES
def test_encoder_pad_ids_do_not_change_logits(cfg):
    other = dict(BATCH)
    new_ids = np.random.default_rng(2).integers(1, 64, size=ENC_SEG.shape)
    other["encoder_inputs"] = np.where(ENC_SEG == 0, new_ids, BATCH["encoder_inputs"])
    logits, logits_other = _logits(cfg), _logits(cfg, other)
    assert np.isfinite(logits).all() and np.isfinite(logits_other).all()
    # The decoder pad of row 0 reads the encoder pads, so the new ids did reach the model.
    assert not np.allclose(logits[DEC_SEG == 0], logits_other[DEC_SEG == 0])
    np.testing.assert_allclose(logits[DEC_SEG != 0], logits_other[DEC_SEG != 0], atol=1e-6)


@WITH_WIDE
def test_packed_examples_match_examples_alone(cfg):
    enc, dec = BATCH["encoder_inputs"][0], BATCH["decoder_inputs"][0]
    alone = {k: np.zeros((2, v.shape[1]), v.dtype) for k, v in BATCH.items()}
    for row, (enc_span, dec_span) in enumerate([((0, 5), (0, 4)), ((5, 9), (4, 7))]):
        n_enc, n_dec = enc_span[1] - enc_span[0], dec_span[1] - dec_span[0]
        alone["encoder_inputs"][row, :n_enc] = enc[slice(*enc_span)]
        alone["decoder_inputs"][row, :n_dec] = dec[slice(*dec_span)]
        alone["encoder_segment_ids"][row, :n_enc] = 1
        alone["decoder_segment_ids"][row, :n_dec] = 1
        alone["encoder_positions"][row, :n_enc] = np.arange(n_enc)
        alone["decoder_positions"][row, :n_dec] = np.arange(n_dec)
    packed, single = _logits(cfg)[0], _logits(cfg, alone)
    np.testing.assert_allclose(packed[:4], single[0, :4], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(packed[4:7], single[1, :3], atol=1e-5, rtol=1e-5)


def test_encoder_is_bidirectional_within_each_example(cfg=V11):
    dep = _dependence(cfg, "encode")["encoder_inputs"]  # [B, S, B, S]
    allowed = np.zeros(dep.shape, bool)
    for i in range(len(ENC_SEG)):
        allowed[i, :, i, :] = ENC_SEG[i][:, None] == ENC_SEG[i][None, :]
    np.testing.assert_array_equal(dep[~allowed], 0.0)
    assert (dep[allowed] > 0).all()
    assert (dep[1, 4, 1, :4] > 0).all() and (dep[1, 4, 1, 5:9] > 0).all()  # Before and after.


@STYLES
@pytest.mark.parametrize("side", ["encoder", "decoder"])
def test_only_relative_positions_matter(cfg, side):
    # Bias tables scaled up from their std of 0.02, so that positions change the logits far
    # beyond rounding.
    params = _with_tables(_params(cfg), lambda stack, table: table * 100)
    key = f"{side}_positions"
    shifted, stretched = dict(BATCH), dict(BATCH)
    shifted[key], stretched[key] = BATCH[key] + 5, BATCH[key] * 3
    apply = _apply(cfg)
    logits = np.asarray(apply(params, **BATCH))
    np.testing.assert_allclose(apply(params, **shifted), logits, atol=1e-5, rtol=1e-5)
    assert not np.allclose(apply(params, **stretched), logits, atol=1e-3)  # Positions are used.


def test_each_stack_uses_its_own_buckets(cfg=V11):
    """Raising one row of a bias table changes the logits iff that bucket occurs in the batch.

    8 buckets up to distance 16. Encoder, bidirectional: 4 per direction, 2 exact, distances
    here 0..8; d >= 2 -> 2 + floor(2 * ln(d/2) / ln(8)): d=2..5 -> 2 (5: 2 * 0.44 = 0.88),
    d=6..8 -> 3 (6: 2 * 0.53 = 1.06); later keys add 4, and d=0 is bucket 0, so row 4 is unused.
    Decoder, causal: 8 buckets, 4 exact, distances 0..7; d >= 4 -> 4 + floor(4 * ln(d/4) /
    ln(4)): d=4, 5 -> 4 (5: 4 * 0.16 = 0.64), d=6, 7 -> 5 (6: 4 * 0.29 = 1.17); rows 6, 7 unused.
    """
    params, apply = _params(cfg), _apply(cfg)
    logits = _logits(cfg)
    for stack, want in (("encoder", [0, 1, 2, 3, 5, 6, 7]), ("decoder", [0, 1, 2, 3, 4, 5])):
        used = []
        for row in range(cfg.relative_buckets):
            raised = _with_tables(
                params,
                lambda s, table, row=row, stack=stack: (
                    table.at[row].add(3.0) if s == stack else table
                ),
            )
            if not np.array_equal(apply(raised, **BATCH), logits):
                used.append(row)
        assert used == want, stack


@WITH_WIDE
def test_parameter_tree_names_and_logical_axes(cfg):
    variables = _init(cfg)
    assert set(variables) == {"params"}
    params = variables["params"]
    assert set(params) == {"token_embed", "encoder", "decoder"} | (
        set() if cfg.tie_embeddings else {"lm_head"}
    )
    n_dec = cfg.n_decoder_layers or cfg.n_layers
    assert set(params["encoder"]) == {"relpos_bias", "final_norm", "block_0"}
    assert set(params["decoder"]) == {"relpos_bias", "final_norm"} | {
        f"block_{i}" for i in range(n_dec)
    }
    leaves = jax.tree_util.tree_leaves_with_path(
        variables, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    for path, leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), path
        assert path[-1].key in {"kernel", "bias", "scale", "embedding"}, path
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= ALLOWED_NAMES, path
    # One relative bias table per stack, shared by its layers; none for cross-attention.
    relpos = [jax.tree_util.keystr(p) for p, leaf in leaves if "relpos_buckets" in leaf.names]
    assert relpos == [
        "['params']['decoder']['relpos_bias']['embedding']",
        "['params']['encoder']['relpos_bias']['embedding']",
    ]
    h, k, e, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    for stack in ("encoder", "decoder"):
        table = params[stack]["relpos_bias"]["embedding"]
        assert table.value.shape == (cfg.relative_buckets, h)
        assert table.names == ("relpos_buckets", "heads")
    block = params["decoder"]["block_0"]
    assert set(block) == {
        "pre_self_attn_norm",
        "self_attn",
        "pre_cross_attn_norm",
        "cross_attn",
        "pre_mlp_norm",
        "mlp",
    }
    assert block["cross_attn"]["query"]["kernel"].value.shape == (d, h, e)
    assert block["cross_attn"]["key"]["kernel"].names == ("embed", "kv_heads", "head_dim")
    assert block["cross_attn"]["key"]["kernel"].value.shape == (d, k, e)
    assert block["self_attn"]["out"]["kernel"].value.shape == (h, e, d)
    assert params["token_embed"]["embedding"].names == ("vocab", "embed")
    if not cfg.tie_embeddings:
        assert params["lm_head"]["kernel"].names == ("embed", "vocab")
        assert params["lm_head"]["kernel"].value.shape == (d, cfg.vocab_size)


def test_untying_adds_only_the_head():
    untied = jax.tree.map(np.shape, _params(V11))["params"]
    tied_cfg = dataclasses.replace(V11, tie_embeddings=True)
    zeros = jnp.zeros((1, 12), jnp.int32)
    tied = jax.eval_shape(T5(tied_cfg).init, jax.random.key(0), zeros, zeros)
    tied = jax.tree.map(np.shape, nn.meta.unbox(tied))["params"]
    untied = dict(untied)
    assert untied.pop("lm_head") == {"kernel": (V11.d_model, V11.vocab_size)}
    assert untied == dict(tied)


def test_tied_logits_are_rescaled_decoder_outputs(cfg=TIED):
    @jax.jit
    def logits_and_decoder_output(params):
        captured = {}

        def capture(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.module.name == "decoder" and context.method_name == "__call__":
                captured["y_BLD"] = out
            return out

        with nn.intercept_methods(capture):
            logits = T5(cfg).apply(params, **BATCH)
        return logits, captured["y_BLD"]

    params = _params(cfg)
    logits, y_BLD = logits_and_decoder_output(params)
    table_VD = params["params"]["token_embed"]["embedding"]
    want = np.einsum("bld,vd->blv", y_BLD, table_VD) * cfg.d_model**-0.5
    np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-5)


def test_encode_then_decode_equals_call(cfg=V11):
    params = _params(cfg)
    encoded = _apply(cfg, "encode")(params, **{k: BATCH[k] for k in ENCODER_KEYS})
    assert encoded.shape == (2, 12, cfg.d_model)
    logits = _apply(cfg, "decode")(
        params,
        encoded,
        BATCH["encoder_segment_ids"],
        BATCH["decoder_inputs"],
        BATCH["decoder_segment_ids"],
        BATCH["decoder_positions"],
    )
    np.testing.assert_allclose(logits, _logits(cfg), atol=1e-6, rtol=1e-6)


def test_defaults_are_one_example_per_row(cfg=V11):
    ids = {k: BATCH[k] for k in ("encoder_inputs", "decoder_inputs")}
    explicit = dict(ids)
    explicit["encoder_segment_ids"] = np.ones_like(ENC_SEG)
    explicit["decoder_segment_ids"] = np.ones_like(DEC_SEG)
    explicit["encoder_positions"] = np.broadcast_to(np.arange(12), ENC_SEG.shape)
    explicit["decoder_positions"] = np.broadcast_to(np.arange(8), DEC_SEG.shape)
    np.testing.assert_allclose(_logits(cfg, ids), _logits(cfg, explicit), atol=1e-6)


def test_jit_matches_no_jit(cfg=TIED):  # The smaller; eager runs are slow.
    eager = T5(cfg).apply(_params(cfg), **BATCH)
    assert eager.shape == (2, 8, cfg.vocab_size) and eager.dtype == jnp.float32
    np.testing.assert_allclose(eager, _logits(cfg), atol=1e-5, rtol=1e-5)


@STYLES
def test_bfloat16_compute(cfg):
    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    params = _params(cfg)
    apply = jax.jit(T5(bf16).apply)
    logits = apply(params, **BATCH)
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
    jaxpr = str(jax.make_jaxpr(apply)(params, **BATCH))
    assert "bf16[2,8,4,8]" in jaxpr and "bf16[2,12,4,8]" in jaxpr  # Decoder, encoder queries.
    np.testing.assert_allclose(logits, _logits(cfg), atol=0.05)


def test_dropout_only_when_not_deterministic(cfg=TIED):
    assert cfg.dropout > 0

    def run(seed):
        return np.asarray(
            _apply(cfg)(_params(cfg), **BATCH, rngs={"dropout": _key(seed)}, deterministic=False)
        )

    np.testing.assert_array_equal(run(1), run(1))
    assert not np.allclose(run(1), run(2))
    assert not np.allclose(run(1), _logits(cfg))


@pytest.mark.parametrize("key, value", [("position", "rope"), ("norm_position", "post")])
def test_rejects_absolute_positions_and_post_norm(key, value):
    cfg = dataclasses.replace(V11, **{key: value})
    zeros = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(KilnError, match=key):
        jax.eval_shape(T5(cfg).init, jax.random.key(0), zeros, zeros)
