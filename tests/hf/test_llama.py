"""Llama (LlamaForCausalLM) imported into kiln's modern gpt against transformers; export of a
kiln modern model."""

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from transformers.models.llama import modeling_llama

from kiln import defaults, models
from kiln.hf import checkpoints, files
from kiln.models import layers

from . import lm_checks
from .lm_checks import TOL, VOCAB


def test_rope_is_hf_rotate_half():
    """kiln's half-split rope equals transformers' Llama rope (rotate_half) on random q, k."""
    config = modeling_llama.LlamaConfig(
        hidden_size=64, num_attention_heads=4, rope_theta=500.0, max_position_embeddings=64
    )
    rotary = modeling_llama.LlamaRotaryEmbedding(config)
    rng = np.random.RandomState(0)
    q_BLHE, k_BLHE = rng.randn(2, 2, 9, 4, 16).astype(np.float32)
    positions_BL = rng.randint(0, 64, (2, 9))
    pos = torch.tensor(positions_BL)
    cos, sin = rotary(torch.zeros(1), pos)
    q_hf, k_hf = modeling_llama.apply_rotary_pos_emb(
        torch.tensor(q_BLHE).transpose(1, 2), torch.tensor(k_BLHE).transpose(1, 2), cos, sin
    )
    for ours, theirs in ((q_BLHE, q_hf), (k_BLHE, k_hf)):
        rotated = np.asarray(layers.apply_rope(ours, positions_BL, 500.0))
        np.testing.assert_allclose(rotated, theirs.transpose(1, 2).numpy(), atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_export_of_a_kiln_modern_model(tmp_path, tied):
    """A kiln modern-style model (GQA, its own head_dim) exported loads in transformers with
    the same logits."""
    section = defaults.model_section(
        "gpt",
        vocab_size=VOCAB,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=1,
        head_dim=8,
        d_ff=96,
        max_len=32,
        position="rope",
        norm="rmsnorm",
        mlp="swiglu",
        use_bias=False,
        tie_embeddings=tied,
    )
    model = models.build_model(section)
    boxed = model.init(jax.random.PRNGKey(0), **models.example_inputs(model, 8))["params"]
    rng = np.random.RandomState(0)
    params = jax.tree.map(
        lambda x: (np.asarray(x) + 0.05 * rng.randn(*x.shape)).astype(np.float32),
        nn.unbox(boxed),
    )
    hf_config, tensors = checkpoints.export(section.to_dict(), params)
    assert hf_config["architectures"] == ["LlamaForCausalLM"]
    files.write(str(tmp_path), hf_config, tensors)
    hf_model = lm_checks.load_hf(str(tmp_path))
    tokens = np.random.RandomState(0).randint(0, VOCAB, (2, 16))
    ours = np.asarray(model.apply({"params": params}, tokens))
    assert np.abs(ours - lm_checks.hf_logits(hf_model, tokens)).max() < TOL
