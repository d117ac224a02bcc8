"""The causal LMs transformers writes (GPT2LMHeadModel, LlamaForCausalLM) imported into kiln's
gpt family: logits, decoding and the round trip against transformers, one case per
architecture (their own checks are in test_gpt2.py and test_llama.py)."""

import numpy as np
import pytest

from kiln.hf import checkpoints, files

from . import lm_checks
from .lm_checks import BOS, EOS, TOL, VOCAB


@pytest.fixture(scope="module", params=["gpt2_dir", "llama_dir"])
def hf_dir(request) -> str:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def imported(hf_dir):
    return checkpoints.load(hf_dir)


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return lm_checks.load_hf(hf_dir)


EXPECTED_SECTIONS = {
    "gpt2_dir": dict(
        position="learned",
        norm="layernorm",
        mlp="gelu",
        use_bias=True,
        tie_embeddings=True,
        d_ff=160,
        max_len=64,
        n_kv_heads=4,
    ),
    "llama_dir": dict(
        position="rope",
        norm="rmsnorm",
        mlp="swiglu",
        use_bias=False,
        tie_embeddings=False,
        n_heads=4,
        n_kv_heads=2,
        rope_theta=500.0,
        norm_eps=1e-5,
    ),
}


def test_model_section_follows_the_architecture(request, imported):
    """Each HF config field lands in the matching kiln model field."""
    expected = EXPECTED_SECTIONS[request.node.callspec.params["hf_dir"]]
    section = imported.model
    assert (section.family, section.vocab_size) == ("gpt", VOCAB)
    assert {key: section[key] for key in expected} == expected
    assert imported.unused == ()


def test_logits_match_unpadded(imported, hf_model):
    assert lm_checks.unpadded_diff(imported, hf_model, VOCAB) < TOL


def test_logits_match_padded(imported, hf_model):
    assert lm_checks.padded_diff(imported, hf_model, VOCAB) < TOL


def test_packed_rows_match_each_sequence_alone(imported, hf_model):
    assert lm_checks.packed_diff(imported, hf_model, VOCAB) < TOL


def test_greedy_decoding_matches_generate(imported, hf_model):
    ours, theirs = lm_checks.greedy_tokens(imported, hf_model, VOCAB, EOS, BOS)
    assert ours == theirs
    assert sum(map(len, ours)) > 10  # Something was generated.


def test_round_trip_is_bit_identical(hf_dir, imported):
    _, tensors = checkpoints.export(imported.model.to_dict(), imported.params)
    original = files.read_tensors(hf_dir)
    assert sorted(tensors) == sorted(original)
    for name, value in original.items():
        assert tensors[name].dtype == value.dtype == np.float32
        assert np.array_equal(tensors[name], value), name
