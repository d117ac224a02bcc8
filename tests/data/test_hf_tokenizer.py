"""Hugging Face tokenizers in kiln (kiln.data.hf_tokenizer, kiln.data.spm_to_json and
load_tokenizer / save_tokenizer), checked against transformers' AutoTokenizer.

Every tokenizer is built here, offline: GPT-2 byte-level BPE, BERT WordPiece and Llama-style BPE
with byte fallback trained with the tokenizers library and saved through transformers' fast
classes; T5 as a SentencePiece unigram model with T5's ids saved through T5Tokenizer; kiln's own
BPE and unigram models exported with save_tokenizer.
"""

import json
import os
import pickle
import shutil

import pytest
import transformers

from kiln import config_lib, inputs
from kiln import workdir as workdir_lib
from kiln.data import objectives
from kiln.data.hf_tokenizer import HFTokenizer
from kiln.data.t5_tokenizer import T5SentencePieceTokenizer
from kiln.data.tokenizer import load_tokenizer, save_tokenizer
from kiln.errors import KilnError

ROLES = ("pad", "unk", "bos", "eos", "mask", "cls", "sep")


def auto(path: str, **kwargs):
    return transformers.AutoTokenizer.from_pretrained(path, **kwargs)


def reference_roles(reference) -> dict[str, int | None]:
    """AutoTokenizer's role ids with kiln's two rules: pad falls back to eos; T5's bos is pad."""
    ids = {role: getattr(reference, f"{role}_token_id") for role in ROLES}
    if ids["pad"] is None:
        ids["pad"] = ids["eos"]
    if ids["bos"] is None and "T5" in type(reference).__name__:
        ids["bos"] = ids["pad"]
    return ids


def reference_sentinels(reference) -> tuple[int, ...]:
    vocab = reference.get_vocab()
    return tuple(vocab[f"<extra_id_{i}>"] for i in range(100) if f"<extra_id_{i}>" in vocab)


def assert_same_as_reference(tok, reference, lines: list[str]) -> None:
    """Ids of every line, role ids, sentinels and vocabulary size equal the reference's."""
    expected = [reference(line, add_special_tokens=False).input_ids for line in lines]
    assert tok.encode_batch(lines) == expected
    assert [tok.encode(line) for line in lines[:50]] == expected[:50]
    assert {role: getattr(tok, f"{role}_id") for role in ROLES} == reference_roles(reference)
    assert tok.sentinel_ids == reference_sentinels(reference)
    assert tok.vocab_size == len(reference)
    for i in [0, 1, 2, tok.vocab_size // 2, tok.vocab_size - 1]:
        assert tok.id_to_piece(i) == reference.convert_ids_to_tokens(i)


@pytest.mark.parametrize("name", ["gpt2_dir", "bert_dir", "llama_dir", "t5_fast_dir"])
def test_tokenizer_json_matches_transformers(name, request, lines):
    path = request.getfixturevalue(name)
    tok = load_tokenizer(path)
    assert isinstance(tok, HFTokenizer) and tok.path == type(tok.path)(path)
    assert_same_as_reference(tok, auto(path), lines)


def test_special_ids_per_family(gpt2_dir, bert_dir, llama_dir, t5_fast_dir):
    gpt2, bert, llama, t5 = map(load_tokenizer, (gpt2_dir, bert_dir, llama_dir, t5_fast_dir))
    eot = gpt2.encode("<|endoftext|>")
    assert eot == [gpt2.eos_id] and gpt2.bos_id == gpt2.eos_id == gpt2.pad_id
    assert (gpt2.mask_id, gpt2.cls_id, gpt2.sep_id, gpt2.sentinel_ids) == (None, None, None, ())
    assert [bert.id_to_piece(bert.cls_id), bert.id_to_piece(bert.mask_id)] == ["[CLS]", "[MASK]"]
    assert bert.bos_id is None and bert.eos_id is None
    assert (llama.unk_id, llama.bos_id, llama.eos_id, llama.pad_id) == (0, 1, 2, 2)
    assert (t5.pad_id, t5.eos_id, t5.unk_id, t5.bos_id) == (0, 1, 2, 0)
    assert t5.sentinel_ids[0] == t5.vocab_size - 1 and t5.sentinel_ids[99] == t5.vocab_size - 100


@pytest.mark.parametrize("name", ["gpt2_dir", "llama_dir"])
def test_lossless_tokenizers_decode_back(name, request, lines):
    tok = load_tokenizer(request.getfixturevalue(name))
    for line in lines:
        ids = tok.encode(line)
        assert tok.decode(ids) == line
        assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == line


def test_bert_decodes_lowercased_without_accents(bert_dir):
    tok = load_tokenizer(bert_dir)
    ids = tok.encode("Crème Brûlée")
    assert tok.decode([tok.cls_id, *ids, tok.sep_id, tok.pad_id]) == "creme brulee"


def test_t5_spiece_matches_transformers(t5_dir, lines):
    """Served by sentencepiece like transformers' T5Tokenizer (legacy mode, its default)."""
    tok = load_tokenizer(t5_dir)
    assert isinstance(tok, T5SentencePieceTokenizer)
    literal = ["literal <extra_id_0> and</s> x <pad>y <unk>", "<extra_id_99><extra_id_1>"]
    assert_same_as_reference(tok, auto(t5_dir, use_fast=False), lines + literal)
    sentinels = tok.sentinel_ids
    assert tok.decode([sentinels[0], *tok.encode("a cat"), tok.eos_id, tok.pad_id]) == "a cat"


@pytest.mark.parametrize("name", ["kiln_bpe", "kiln_unigram"])
def test_save_kiln_tokenizer(name, request, lines, tmp_path):
    kiln_tok = request.getfixturevalue(name)
    (tmp_path / "model.safetensors").write_bytes(b"weights")  # other files are kept
    save_tokenizer(kiln_tok, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == b"weights"
    literal = ["literal [MASK] [CLS] [SEP] <extra_id_0> <s> </s> <pad> <unk> <0x41> text"]
    texts = lines + literal
    expected = kiln_tok.encode_batch(texts)
    reference = auto(str(tmp_path))
    assert [reference(t, add_special_tokens=False).input_ids for t in texts] == expected
    assert reference_roles(reference) == {r: getattr(kiln_tok, f"{r}_id") for r in ROLES}
    assert reference_sentinels(reference) == kiln_tok.sentinel_ids
    assert len(reference) == kiln_tok.vocab_size
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode_batch(texts) == expected
    assert all(loaded.decode(ids) == text for ids, text in zip(expected, texts))
    decoded = reference.batch_decode(expected, skip_special_tokens=True)
    assert decoded == [text.replace("\u2581", " ") for text in texts]


@pytest.mark.parametrize("name", ["llama_dir", "t5_dir"])
def test_save_imported_tokenizer_copies_it(name, request, tmp_path, lines):
    tok = load_tokenizer(request.getfixturevalue(name))
    save_tokenizer(tok, tmp_path / "out")
    copy = pickle.loads(pickle.dumps(load_tokenizer(tmp_path / "out")))  # also picklable
    assert type(copy) is type(tok) and copy.encode_batch(lines) == tok.encode_batch(lines)
    assert (copy.bos_id, copy.pad_id, copy.sentinel_ids) == (
        tok.bos_id,
        tok.pad_id,
        tok.sentinel_ids,
    )
    reference = auto(str(tmp_path / "out"), use_fast=name != "t5_dir")
    expected = [reference(t, add_special_tokens=False).input_ids for t in lines[:50]]
    assert tok.encode_batch(lines[:50]) == expected


def test_hub_style_directory_uses_class_defaults(gpt2_dir, tmp_path, lines):
    """Like the hub's gpt2: tokenizer_config.json names no tokens or class; config.json says
    model_type gpt2. The copy kiln makes loads alone (no config.json) with the same roles."""
    hub = tmp_path / "hub"
    hub.mkdir()
    shutil.copyfile(os.path.join(gpt2_dir, "tokenizer.json"), hub / "tokenizer.json")
    (hub / "tokenizer_config.json").write_text('{"model_max_length": 1024}')
    (hub / "config.json").write_text('{"model_type": "gpt2", "vocab_size": 1200}')
    tok = load_tokenizer(hub)
    reference = auto(str(hub))
    assert_same_as_reference(tok, reference, lines[:60])
    assert tok.eos_id is not None and tok.eos_id == tok.bos_id
    save_tokenizer(tok, tmp_path / "copy")
    assert not (tmp_path / "copy" / "config.json").exists()
    assert_same_as_reference(load_tokenizer(tmp_path / "copy"), auto(str(tmp_path / "copy")), [])


def test_config_tokens_missing_from_tokenizer_json_are_added(gpt2_dir, tmp_path, lines):
    """transformers adds special tokens that the config names and tokenizer.json lacks."""
    shutil.copyfile(os.path.join(gpt2_dir, "tokenizer.json"), tmp_path / "tokenizer.json")
    config = {"tokenizer_class": "GPT2Tokenizer", "pad_token": "<pad>", "mask_token": "<mask>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok, reference = load_tokenizer(tmp_path), auto(str(tmp_path))
    assert tok.pad_id == 1200 and tok.mask_id == 1201
    assert_same_as_reference(tok, reference, lines[:60] + ["a <mask> b<pad>"])


def tiny_config(vocab_size: int, path: str = ""):
    config = config_lib.load_config("experiments/gpt/pretrain.py:size=tiny")
    config.model.vocab_size = vocab_size
    config.tokenizer.path = path
    return config


def test_workdir_copies_an_imported_tokenizer_directory(bert_dir, tmp_path, lines):
    source = tmp_path / "checkpoint"
    shutil.copytree(bert_dir, source)
    (source / "model.safetensors").write_bytes(b"not copied")
    (source / "config.json").write_text('{"model_type": "bert"}')
    first = tmp_path / "first"
    first.mkdir()
    tok = inputs.prepare_tokenizer(tiny_config(1280, str(source)), str(first), ["unused"])
    assert workdir_lib.tokenizer_path(str(first)) == str(first / "tokenizer")
    assert not (first / "tokenizer" / "model.safetensors").exists()
    assert tok.encode_batch(lines) == load_tokenizer(bert_dir).encode_batch(lines)
    # The next stage takes it from this run's workdir (as init_from or tokenizer.path does).
    second = tmp_path / "second"
    second.mkdir()
    again = inputs.prepare_tokenizer(tiny_config(1200, str(first)), str(second), [])
    assert (second / "tokenizer" / "tokenizer.json").read_bytes() == (
        source / "tokenizer.json"
    ).read_bytes()
    assert again.encode_batch(lines) == tok.encode_batch(lines)
    third = tmp_path / "third"
    third.mkdir()
    named = inputs.prepare_tokenizer(
        tiny_config(1200, str(source / "tokenizer.json")), str(third), []
    )
    assert named.vocab_size == tok.vocab_size


def test_workdir_tokenizer_path(tmp_path, kiln_bpe, gpt2_dir):
    with pytest.raises(KilnError, match=r"tokenizer\.model.*tokenizer/.*tokenizer\.json"):
        workdir_lib.tokenizer_path(str(tmp_path))
    assert workdir_lib.tokenizer_path(gpt2_dir) == gpt2_dir  # a save_pretrained directory
    shutil.copyfile(kiln_bpe.path, tmp_path / "tokenizer.model")
    assert workdir_lib.tokenizer_path(str(tmp_path)) == str(tmp_path / "tokenizer.model")
    # A Llama checkpoint ships a sentencepiece tokenizer.model beside its tokenizer.json: the
    # directory is an HF tokenizer, not a kiln workdir.
    llama_like = tmp_path / "llama"
    shutil.copytree(gpt2_dir, llama_like)
    shutil.copyfile(kiln_bpe.path, llama_like / "tokenizer.model")
    assert workdir_lib.tokenizer_path(str(llama_like)) == str(llama_like)


def test_bad_tokenizer_inputs(tmp_path, gpt2_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KilnError, match=r"tokenizer\.json.*spiece\.model"):
        load_tokenizer(empty)
    with pytest.raises(KilnError, match=r"tokenizer\.path=.*tokenizer\.json or spiece\.model"):
        inputs.prepare_tokenizer(tiny_config(1200, str(empty)), str(tmp_path), [])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
    with pytest.raises(KilnError, match=r"broken/tokenizer\.json"):
        load_tokenizer(broken)
    (broken / "tokenizer.json").unlink()
    (broken / "spiece.model").write_bytes(b"not a model")
    with pytest.raises(KilnError, match=r"spiece\.model is not a valid SentencePiece"):
        load_tokenizer(broken)
    workdir = tmp_path / "w"
    workdir.mkdir()
    with pytest.raises(KilnError, match=r"model\.vocab_size=1000 .* 1200 pieces"):
        inputs.prepare_tokenizer(tiny_config(1000, gpt2_dir), str(workdir), [])


@pytest.mark.parametrize(
    "objective, layout, missing",
    [
        ("mlm", "encoder", "MASK"),
        ("span_corruption", "encoder_decoder", "sentinel"),
    ],
)
def test_objective_needs_a_token_the_tokenizer_lacks(gpt2_dir, objective, layout, missing):
    tok = load_tokenizer(gpt2_dir)
    pattern = rf"objective\.name='{objective}' needs .*{missing}.*tokenizer at {gpt2_dir} has none"
    with pytest.raises(KilnError, match=pattern):
        objectives.make_objective(objective, layout, tok, 64)


def test_imported_tokenizers_drive_the_objectives(bert_dir, t5_fast_dir):
    bert = load_tokenizer(bert_dir)
    mlm = objectives.make_objective("mlm", "encoder", bert, 64)
    assert mlm.mask_id == bert.mask_id and mlm.vocab_size == bert.vocab_size
    t5 = load_tokenizer(t5_fast_dir)
    span = objectives.make_objective("span_corruption", "encoder_decoder", t5, 64)
    assert span.sentinel_ids == t5.sentinel_ids and span.bos_id == t5.pad_id == 0
