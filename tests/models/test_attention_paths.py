"""The attention paths compute the same function: kiln's own attention (CPUs), the
jax.nn.dot_product_attention path (GPUs), and the head inputs the fused loss takes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kiln.models import attention, bert, gpt, layers, t5
from kiln.models.layers import TransformerConfig


def _packed_segments(rows: int, length: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    seg = np.ones((rows, length), np.int32)
    for r in range(rows):
        for cut in sorted(rng.choice(np.arange(1, length - 1), size=3, replace=False)):
            seg[r, cut:] += 1
    seg[0, -5:] = 0  # padding
    return seg


def _numpy_attention(q, k, v, bias):
    """softmax(q k^T + bias) v with kv head n // G for query head n, in float64."""
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    logits = np.einsum("blhe,bshe->bhls", q, k).astype(np.float64) + bias
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhls,bshe->blhe", probs, v)


@pytest.mark.parametrize("per_head_bias", [False, True], ids=["mask", "mask+relative"])
def test_attention_equals_numpy(per_head_bias):
    """kiln's attention == a float64 numpy reference for packed, padded causal rows, grouped kv
    heads and a per-head bias (as T5's); its gradients == those of the numpy formula's jax
    twin."""
    b, length, h, k, e = 2, 32, 4, 2, 8
    rng = np.random.default_rng(0)
    q, key, v = (rng.normal(size=(b, length, n, e)).astype(np.float32) for n in (h, k, k))
    bias = np.asarray(layers.mask_to_bias(layers.causal_mask(_packed_segments(b, length, 0))))
    if per_head_bias:
        bias = bias + rng.normal(size=(b, h, length, length)).astype(np.float32)

    def attend(q, key, v):
        return attention._attention(q, key, v, bias, lambda p: p, jnp.float32)

    def reference(q, key, v):  # The numpy formula in jax, for gradients.
        groups = h // k
        key, v = jnp.repeat(key, groups, axis=2), jnp.repeat(v, groups, axis=2)
        probs = jax.nn.softmax(jnp.einsum("blhe,bshe->bhls", q, key) + bias, axis=-1)
        return jnp.einsum("bhls,bshe->blhe", probs, v)

    np.testing.assert_allclose(attend(q, key, v), _numpy_attention(q, key, v, bias), atol=1e-5)
    grads = [
        jax.grad(lambda *a, f=f: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, key, v)
        for f in (attend, reference)
    ]
    for got, ref in zip(*grads):
        np.testing.assert_allclose(got, ref, atol=1e-5)


GPT_MODERN = TransformerConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=128,
    position="rope", norm="rmsnorm", mlp="swiglu", use_bias=False, tie_embeddings=False,
)  # fmt: skip
GPT2 = dataclasses.replace(GPT_MODERN, position="learned", norm="layernorm", mlp="gelu",
                           use_bias=True, tie_embeddings=True, n_kv_heads=4)  # fmt: skip
BERT = dataclasses.replace(GPT2, norm_position="post", type_vocab_size=2)
T5 = dataclasses.replace(
    GPT_MODERN, position="none", mlp="geglu", scale_attention=False, relative_buckets=8,
    relative_max_distance=32, n_decoder_layers=1,
)  # fmt: skip
T5_TIED = dataclasses.replace(T5, tie_embeddings=True)
LENGTH = 128


def _case(name: str):
    """(module, inputs) with packed, padded rows of LENGTH tokens."""
    rng = np.random.default_rng(1)
    seg = _packed_segments(2, LENGTH, 1)
    tokens = rng.integers(1, 64, size=seg.shape).astype(np.int32)
    if name.startswith("t5"):
        module = t5.T5(T5 if name == "t5" else T5_TIED)
        inputs = {
            "encoder_inputs": tokens,
            "decoder_inputs": rng.integers(1, 64, size=seg.shape).astype(np.int32),
            "encoder_segment_ids": seg,
            "decoder_segment_ids": seg,
        }
        return module, inputs
    cls, cfg = {"gpt": (gpt.GPT, GPT_MODERN), "gpt2": (gpt.GPT, GPT2), "bert": (bert.BERT, BERT)}[
        name
    ]
    return cls(cfg), {"inputs": tokens, "segment_ids": seg}


CASES = ["gpt", "gpt2", "bert", "t5", "t5_tied"]


@pytest.mark.parametrize("name", CASES)
def test_models_agree_through_every_attention_path(name, monkeypatch):
    """Default (kiln's attention on CPU) == jax.nn.dot_product_attention."""
    module, inputs = _case(name)
    params = module.init(jax.random.PRNGKey(0), **inputs)
    default = np.asarray(module.apply(params, **inputs))
    monkeypatch.setattr(attention, "use_dot_product_attention", lambda: True)
    fused_kernel = np.asarray(module.apply(params, **inputs))
    np.testing.assert_allclose(fused_kernel, default, atol=1e-5 * np.abs(default).max())


@pytest.mark.parametrize("name", CASES)
def test_head_inputs_make_the_logits(name):
    """x . table^T + bias from `head_inputs=True` are the model's logits."""
    module, inputs = _case(name)
    params = module.init(jax.random.PRNGKey(0), **inputs)
    logits = np.asarray(module.apply(params, **inputs))
    x, table, bias = module.apply(params, **inputs, head_inputs=True)
    rebuilt = np.einsum("bld,vd->blv", np.asarray(x), np.asarray(table))
    rebuilt = rebuilt + (0 if bias is None else np.asarray(bias))
    np.testing.assert_allclose(rebuilt, logits, atol=1e-5 * np.abs(logits).max())
