"""GPT-2 (GPT2LMHeadModel) imported into kiln's gpt family against transformers."""

import numpy as np
import pytest

from kiln.hf import checkpoints, files

from . import lm_checks
from .lm_checks import BOS, EOS, TOL, VOCAB


@pytest.fixture(scope="module")
def imported(gpt2_dir):
    return checkpoints.load(gpt2_dir)


@pytest.fixture(scope="module")
def hf_model(gpt2_dir):
    return lm_checks.load_hf(gpt2_dir)


def test_model_section_is_gpt2_style(imported):
    m = imported.model
    assert (m.family, m.position, m.norm, m.mlp, m.use_bias) == (
        "gpt",
        "learned",
        "layernorm",
        "gelu",
        True,
    )
    assert (m.vocab_size, m.d_ff, m.max_len, m.tie_embeddings) == (VOCAB, 160, 64, True)
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


def test_round_trip_is_bit_identical(gpt2_dir, imported):
    _, tensors = checkpoints.export(imported.model.to_dict(), imported.params)
    original = files.read_tensors(gpt2_dir)
    assert sorted(tensors) == sorted(original)
    for name, value in original.items():
        assert tensors[name].dtype == value.dtype == np.float32
        assert np.array_equal(tensors[name], value), name
