"""kiln.hf.bert against transformers' BERT: logits parity, packing, round trips, bad tensors.

Small random transformers models (parameters perturbed after init, so biases and norm scales
are not trivial) are saved with save_pretrained; kiln imports the saved tensors.
"""

import dataclasses
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from kiln import defaults, models
from kiln.errors import KilnError
from kiln.hf import bert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

VOCAB, LENGTH = 1001, 14
HF_CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=32,
    type_vocab_size=2,
)
_rng = np.random.default_rng(0)
TOKENS = _rng.integers(1, VOCAB, size=(2, LENGTH))
TYPES = np.array([[0] * 6 + [1] * 8, [0] * 9 + [1] * 5])
MASK = np.array([[1] * LENGTH, [1] * 9 + [0] * 5])  # Row 1 right-padded.


@dataclasses.dataclass(frozen=True)
class Saved:
    """An HF model and what save_pretrained wrote for it."""

    hf: torch.nn.Module
    config: dict
    tensors: dict


def _perturb(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _save(hf: torch.nn.Module, tmp_path_factory) -> Saved:
    path = tmp_path_factory.mktemp("hf_bert")
    hf.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    return Saved(hf.eval(), config, safetensors_numpy.load_file(path / "model.safetensors"))


@pytest.fixture(scope="module", params=["gelu", "gelu_new"], ids=["exact_gelu", "tanh_gelu"])
def mlm(request, tmp_path_factory) -> Saved:
    torch.manual_seed(0)
    config = transformers.BertConfig(**HF_CONFIG, hidden_act=request.param)
    hf = transformers.BertForMaskedLM(config)
    _perturb(hf, 1)
    return _save(hf, tmp_path_factory)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Saved:
    torch.manual_seed(2)
    hf = transformers.BertForSequenceClassification(
        transformers.BertConfig(**HF_CONFIG, num_labels=3)
    )
    _perturb(hf, 3)
    return _save(hf, tmp_path_factory)


def _hf_logits(hf, tokens, mask, types) -> np.ndarray:
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
        )
    return out.logits.numpy()


def _kiln_apply(fields, params, num_classes=0):
    model = models.build_model(fields, num_classes=num_classes)
    return jax.jit(lambda *args: model.apply({"params": params}, *args))


def test_mlm_logits_match_transformers_unpadded_and_padded(mlm):
    fields, params = bert.to_kiln(mlm.config, mlm.tensors)
    assert fields["gelu_approximate"] == (mlm.config["hidden_act"] != "gelu")
    assert fields["norm_eps"] == 1e-12 and fields["type_vocab_size"] == 2
    want = _hf_logits(mlm.hf, TOKENS, MASK, TYPES)
    positions = np.broadcast_to(np.arange(LENGTH), TOKENS.shape)
    got = np.asarray(_kiln_apply(fields, params)(TOKENS, MASK, positions, TYPES))
    assert got.shape == (2, LENGTH, VOCAB)
    real = MASK == 1
    diff = np.abs(got[real] - want[real]).max()
    print(f"BERT {mlm.config['hidden_act']}: max |logit diff| {diff:.2e}")
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)
    # The other GELU would fail the tolerance above: the option is what makes parity.
    other = dict(fields, gelu_approximate=not fields["gelu_approximate"])
    off = np.asarray(_kiln_apply(other, params)(TOKENS, MASK, positions, TYPES))
    print(f"  with the other GELU: {np.abs(off[real] - want[real]).max():.2e}")
    assert np.abs(off[real] - want[real]).max() > 2e-4


def test_packed_documents_match_each_alone_in_transformers(mlm):
    fields, params = bert.to_kiln(mlm.config, mlm.tensors)
    a, b = TOKENS[0, :6], TOKENS[1, :8]
    types_a, types_b = np.array([0, 0, 0, 1, 1, 1]), np.array([0] * 4 + [1] * 4)
    packed = np.zeros((1, LENGTH), np.int64)
    packed[0, :14] = np.concatenate([a, b])
    seg = np.array([[1] * 6 + [2] * 8])
    pos = np.array([[*range(6), *range(8)]])
    types = np.concatenate([types_a, types_b])[None]
    got = np.asarray(_kiln_apply(fields, params)(packed, seg, pos, types))[0]
    for tokens, types_1, span in ((a, types_a, slice(0, 6)), (b, types_b, slice(6, 14))):
        ones = np.ones((1, len(tokens)), np.int64)
        want = _hf_logits(mlm.hf, tokens[None], ones, types_1[None])[0]
        np.testing.assert_allclose(got[span], want, atol=1e-4, rtol=0)


def test_round_trip_hf_kiln_hf_is_bit_identical(mlm):
    config, tensors = bert.to_hf(*bert.to_kiln(mlm.config, mlm.tensors))
    assert config["architectures"] == ["BertForMaskedLM"]
    assert config["hidden_act"] == (
        "gelu_new" if mlm.config["hidden_act"] == "gelu_new" else "gelu"
    )
    assert set(tensors) == set(mlm.tensors)
    for name, value in mlm.tensors.items():
        assert tensors[name].dtype == value.dtype and np.array_equal(tensors[name], value), name


def test_kiln_initialised_bert_exports_to_transformers():
    fields = dict(defaults.model_section("bert").to_dict())
    fields.update(vocab_size=VOCAB, d_model=64, n_heads=4, n_kv_heads=4, d_ff=128, max_len=32)
    fields.update(norm_position="post", type_vocab_size=2, norm_eps=1e-12)
    model = models.build_model(fields)
    zeros = np.zeros((1, 8), np.int32)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(4), inputs=zeros)["params"])
    rng = np.random.default_rng(5)  # Biases and norm scales away from 0 and 1.
    params = jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.normal(size=x.shape), params)
    params = jax.tree.map(lambda x: x.astype(np.float32), params)
    config, tensors = bert.to_hf(fields, params)
    assert config["hidden_act"] == "gelu_new"  # kiln's default GELU, the tanh form.
    hf = transformers.BertForMaskedLM(transformers.BertConfig(**config)).eval()
    missing, unexpected = hf.load_state_dict(
        {k: torch.tensor(v) for k, v in tensors.items()}, strict=False
    )
    assert not unexpected and set(missing) <= {
        "cls.predictions.decoder.weight",  # Tied to the word embeddings and the bias.
        "cls.predictions.decoder.bias",
    }
    want = _hf_logits(hf, TOKENS, MASK, TYPES)
    positions = np.broadcast_to(np.arange(LENGTH), TOKENS.shape)
    got = np.asarray(_kiln_apply(fields, params)(TOKENS, MASK, positions, TYPES))
    np.testing.assert_allclose(got[MASK == 1], want[MASK == 1], atol=1e-4, rtol=0)


def test_sequence_classifier_maps_onto_bert_classifier(classifier):
    fields, params = bert.to_kiln(classifier.config, classifier.tensors)
    assert "mlm_head" not in params and set(params["pooler"]) == {"kernel", "bias"}
    assert params["classifier"]["kernel"].shape == (64, 3)
    with torch.no_grad():
        want = classifier.hf(
            input_ids=torch.tensor(TOKENS),
            attention_mask=torch.tensor(MASK),
            token_type_ids=torch.tensor(TYPES),
        ).logits.numpy()
    positions = np.broadcast_to(np.arange(LENGTH), TOKENS.shape)
    got = np.asarray(_kiln_apply(fields, params, 3)(TOKENS, MASK, positions, TYPES))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    config, tensors = bert.to_hf(fields, params)
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["num_labels"] == 3 and set(tensors) == set(classifier.tensors)
    for name, value in classifier.tensors.items():
        assert np.array_equal(tensors[name], value), name


def test_a_tensor_of_the_wrong_shape_is_named(mlm):
    name = "bert.encoder.layer.1.intermediate.dense.weight"
    bad = dict(mlm.tensors, **{name: mlm.tensors[name][:, :32]})
    with pytest.raises(KilnError, match=f"'{name}' has shape \\(128, 32\\)"):
        bert.to_kiln(mlm.config, bad)
    missing = {k: v for k, v in mlm.tensors.items() if k != "bert.embeddings.LayerNorm.weight"}
    with pytest.raises(KilnError, match="'bert.embeddings.LayerNorm.weight' is missing"):
        bert.to_kiln(mlm.config, missing)


def test_unsupported_options_are_refused(mlm):
    with pytest.raises(KilnError, match="hidden_act='silu'"):
        bert.to_kiln(dict(mlm.config, hidden_act="silu"), mlm.tensors)
    with pytest.raises(KilnError, match="position_embedding_type='relative_key'"):
        bert.to_kiln(dict(mlm.config, position_embedding_type="relative_key"), mlm.tensors)
    modern = defaults.model_section("bert", position="rope", norm="rmsnorm").to_dict()
    with pytest.raises(KilnError, match="model.norm_position='post'"):
        bert.to_hf(modern, {})


def test_legacy_layernorm_names_and_a_bare_body_import_the_same(mlm):
    _, params = bert.to_kiln(mlm.config, mlm.tensors)
    # Original TF-converted checkpoints name LayerNorm parameters gamma / beta; a BertModel
    # is saved without the "bert." prefix (and without heads).
    renamed = {}
    for name, value in mlm.tensors.items():
        if name.startswith("bert."):
            name = name.removeprefix("bert.").replace("LayerNorm.weight", "LayerNorm.gamma")
            renamed[name.replace("LayerNorm.bias", "LayerNorm.beta")] = value
    _, body = bert.to_kiln(mlm.config, renamed)
    assert set(body) == set(params) - {"mlm_head"}
    for path, value in jax.tree_util.tree_leaves_with_path(body):
        want = params
        for key in path:
            want = want[key.key]
        assert np.array_equal(value, want), path
