"""kiln.hf.t5 against transformers' T5 v1.0 and v1.1: logits parity (encoder and decoder
padding, packing), greedy decoding, round trips, bad tensors.

Small random transformers models (parameters perturbed after init, so norm scales are not
trivial and the relative bias tables matter) are saved with save_pretrained; kiln imports the
saved tensors.
"""

import dataclasses
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from kiln import decoding, defaults, models
from kiln.errors import KilnError
from kiln.hf import t5

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

VOCAB = 1001
COMMON = dict(vocab_size=VOCAB, d_model=64, d_ff=128, num_heads=4, num_layers=2)
COMMON |= dict(decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
STYLES = {
    # v1.1: gated GELU, untied head; d_kv 24 (4 x 24 != d_model 64), a deeper decoder, and few
    # buckets up to a short distance so these lengths reach the log-spaced buckets.
    "v1_1": dict(
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        d_kv=24,
        num_decoder_layers=3,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
    ),
    # v1.0: ReLU, output tied to the shared embedding (with the d_model^-0.5 scaling).
    "v1_0": dict(feed_forward_proj="relu", tie_word_embeddings=True, d_kv=16),
}
ENC_LEN, DEC_LEN = 14, 9
_rng = np.random.default_rng(0)
ENC = _rng.integers(2, VOCAB, size=(2, ENC_LEN))
DEC = _rng.integers(2, VOCAB, size=(2, DEC_LEN))
ENC_MASK = np.array([[1] * ENC_LEN, [1] * 10 + [0] * 4])  # Row 1: encoder padding.
DEC_MASK = np.array([[1] * 6 + [0] * 3, [1] * DEC_LEN])  # Row 0: decoder padding.
# The same batch for kiln: HF's attention masks are its segment ids (0 = padding).
PADDED = dict(encoder_inputs=ENC, decoder_inputs=DEC)
PADDED |= dict(encoder_segment_ids=ENC_MASK, decoder_segment_ids=DEC_MASK)


@dataclasses.dataclass(frozen=True)
class Saved:
    """An HF model and what save_pretrained wrote for it."""

    hf: torch.nn.Module
    config: dict
    tensors: dict


@pytest.fixture(scope="module", params=list(STYLES))
def saved(request, tmp_path_factory) -> Saved:
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(
        transformers.T5Config(**COMMON, **STYLES[request.param])
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            if name.endswith((".o.weight", ".wo.weight")):  # Blocks outweigh the residual
                p.mul_(4.0)  # (else tied v1.0 greedily repeats its input token).
        for stack in (hf.encoder, hf.decoder):  # Bias tables that move the logits.
            table = stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight
            table.add_(torch.randn(table.shape, generator=gen))
    path = tmp_path_factory.mktemp("hf_t5")
    hf.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    return Saved(hf.eval(), config, safetensors_numpy.load_file(path / "model.safetensors"))


def _hf_logits(hf, enc, enc_mask, dec, dec_mask) -> np.ndarray:
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(enc),
            attention_mask=torch.tensor(enc_mask),
            decoder_input_ids=torch.tensor(dec),
            decoder_attention_mask=torch.tensor(dec_mask),
        )
    return out.logits.numpy()


def _kiln_logits(fields, params, **batch) -> np.ndarray:
    model = models.build_model(fields)
    return np.asarray(jax.jit(model.apply)({"params": params}, **batch))


def test_logits_match_transformers_with_encoder_and_decoder_padding(saved):
    fields, params = t5.to_kiln(saved.config, saved.tensors)
    want = _hf_logits(saved.hf, ENC, ENC_MASK, DEC, DEC_MASK)
    got = _kiln_logits(fields, params, **PADDED)
    real = DEC_MASK == 1
    diff = np.abs(got[real] - want[real]).max()
    print(f"T5 {saved.config['feed_forward_proj']}: max |logit diff| {diff:.2e}")
    assert np.abs(want[real]).max() > 1.0  # Logits well away from 0, so atol means something.
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


def test_packed_examples_match_each_alone_in_transformers(saved):
    fields, params = t5.to_kiln(saved.config, saved.tensors)
    (ea, eb), (da, db) = (ENC[0, :8], ENC[1, :6]), (DEC[0, :5], DEC[1, :4])
    got = _kiln_logits(
        fields,
        params,
        encoder_inputs=np.concatenate([ea, eb])[None],
        decoder_inputs=np.concatenate([da, db])[None],
        encoder_segment_ids=np.array([[1] * 8 + [2] * 6]),
        decoder_segment_ids=np.array([[1] * 5 + [2] * 4]),
        encoder_positions=np.array([[*range(8), *range(6)]]),
        decoder_positions=np.array([[*range(5), *range(4)]]),
    )[0]
    for enc, dec, span in ((ea, da, slice(0, 5)), (eb, db, slice(5, 9))):
        ones_e, ones_d = np.ones((1, len(enc)), np.int64), np.ones((1, len(dec)), np.int64)
        want = _hf_logits(saved.hf, enc[None], ones_e, dec[None], ones_d)[0]
        np.testing.assert_allclose(got[span], want, atol=1e-4, rtol=0)


def test_greedy_decoding_matches_transformers_generate(saved):
    fields, params = t5.to_kiln(saved.config, saved.tensors)
    prompts = [list(ENC[0, :11]) + [1], list(ENC[1, :5]) + [1]]  # Ending in eos, as T5's.
    steps = 10
    got = decoding.generate(
        models.build_model(fields),
        params,
        prompts,
        decoding.DecodeOptions(strategy="greedy", max_new_tokens=steps),
        eos_id=saved.config["eos_token_id"],
        bos_id=saved.config["decoder_start_token_id"],  # HF T5 starts from pad, id 0.
    )
    for prompt, kiln_ids in zip(prompts, got, strict=True):
        with torch.no_grad():
            # Without HF's cache: transformers 4.57 sizes it by num_layers, not by the deeper
            # num_decoder_layers of v1_1 (IndexError in cache_utils).
            out = saved.hf.generate(
                torch.tensor([prompt]),
                do_sample=False,
                num_beams=1,
                max_new_tokens=steps,
                use_cache=False,
            )[0].tolist()
        assert out[0] == 0  # The decoder start id.
        hf_ids = out[1:]
        hf_ids = hf_ids[: hf_ids.index(1)] if 1 in hf_ids else hf_ids  # Up to eos.
        assert len(hf_ids) >= 3 and len(set(hf_ids)) >= 2  # Not a trivial sequence.
        assert kiln_ids == hf_ids


def test_round_trip_hf_kiln_hf_is_bit_identical(saved):
    fields, params = t5.to_kiln(saved.config, saved.tensors)
    assert fields["head_dim"] == (24 if saved.config["d_kv"] == 24 else 0)
    config, tensors = t5.to_hf(fields, params)
    for key in ("d_kv", "feed_forward_proj", "tie_word_embeddings", "num_decoder_layers"):
        assert config[key] == getattr(saved.hf.config, key), key
    assert set(tensors) == set(saved.tensors)
    for name, value in saved.tensors.items():
        assert tensors[name].dtype == value.dtype and np.array_equal(tensors[name], value), name


@pytest.mark.parametrize("style", list(STYLES))
def test_kiln_initialised_t5_exports_to_transformers(style):
    fields = defaults.model_section("t5").to_dict()
    fields.update(vocab_size=VOCAB, d_model=64, d_ff=128, n_layers=2, n_heads=4, n_kv_heads=4)
    fields.update(position="none", norm="rmsnorm", use_bias=False, scale_attention=False)
    if style == "v1_1":
        fields.update(mlp="geglu", tie_embeddings=False, head_dim=24, norm_eps=1e-6)
    else:
        fields.update(mlp="relu", tie_embeddings=True, n_decoder_layers=3)
    model = models.build_model(fields)
    zeros = np.zeros((1, 8), np.int32)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(2), zeros, zeros)["params"])
    rng = np.random.default_rng(3)  # Norm scales away from 1, tables away from 0.
    params = jax.tree.map(lambda x: (x * (1 + rng.normal(size=x.shape))).astype("f4"), params)
    config, tensors = t5.to_hf(fields, params)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**config)).eval()
    missing, unexpected = hf.load_state_dict(
        {k: torch.tensor(v) for k, v in tensors.items()}, strict=False
    )
    tied = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}
    assert not unexpected and set(missing) <= tied  # Copies of shared.weight if tied.
    want = _hf_logits(hf, ENC, ENC_MASK, DEC, DEC_MASK)
    got = _kiln_logits(fields, params, **PADDED)
    real = DEC_MASK == 1
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


def test_a_tensor_of_the_wrong_shape_is_named(saved):
    name = "decoder.block.1.layer.1.EncDecAttention.o.weight"
    bad = dict(saved.tensors, **{name: saved.tensors[name][:, :-1]})
    with pytest.raises(KilnError, match=f"'{name}' has shape"):
        t5.to_kiln(saved.config, bad)
    relpos = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    missing = {k: v for k, v in saved.tensors.items() if k != relpos}
    with pytest.raises(KilnError, match=f"'{relpos}' is missing"):
        t5.to_kiln(saved.config, missing)


def test_unsupported_options_are_refused(saved):
    with pytest.raises(KilnError, match="feed_forward_proj='gated-relu'"):
        t5.to_kiln(dict(saved.config, feed_forward_proj="gated-relu"), saved.tensors)
    gqa = defaults.model_section("t5", position="none", n_kv_heads=2).to_dict()
    with pytest.raises(KilnError, match="n_kv_heads"):
        t5.to_hf(gqa, {})
