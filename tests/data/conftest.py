"""Small real Hugging Face tokenizers, built offline for the tests of tests/data/: GPT-2
byte-level BPE, BERT WordPiece and Llama-style BPE with byte fallback trained with the
tokenizers library and saved through transformers' fast classes; T5 as a SentencePiece unigram
model with T5's ids saved through T5Tokenizer; kiln's own BPE and unigram models."""

import io
import json
import os
import random

import pytest
import sentencepiece as spm
import transformers
from test_tokenizer import make_corpus, random_unicode
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from kiln.data import corpus
from kiln.data.tokenizer import Tokenizer, train_tokenizer

HANDWRITTEN = [
    "Crème brûlée, naïve café, déjà vu — Ångström, façade, São Paulo, Dvořák, Łódź.",
    "ÉCOLE Ÿ ŒUVRE ß straße İstanbul ǅ ﬁnance ① ½ Ｆｕｌｌｗｉｄｔｈ",
    "東京で雨が降る。北京欢迎你！ 한국어 문장입니다.",
    "🙂🚀 emoji 👩‍👩‍👧‍👦 family 🇫🇷 flag 🧑🏽‍💻 coder",
    "שלום עולם — مرحبا بالعالم (right to left) עברית123",
    "\tindented\twith\ttabs\t\tand  two  spaces   three    four",
    "     leading spaces and trailing ones     ",
    "line\nbreaks\r\nand\rcarriage returns\n\n",
    "e\u0301 combining acute, a\u0308 umlaut, \u200b zero width, \u00a0 nbsp, \u2003 em space",
    "code: def f(x):\n    return [x ** 2 for x in range(10) if x % 3 != 0]  # <= >= != {}",
    "URLs: https://example.org/a?b=c&d=e#f and e-mail someone@example.com",
    "numbers 3.14159 1,000,000 -42 0x1F 1e-9 ...!!! ??? --- ___ ***",
    "quotes: 'single' \"double\" «guillemets» „low“ ‘curly’ `back`",
    "repeated: aaaaaaaaaaaaaaaaaaaa ........ !!!!!!!!!! ──────── ✓✓✓",
    "Привет, мир! Ελληνικά κείμενα. Հայերեն. ქართული. हिन्दी में वाक्य। ภาษาไทย",
    "",
    " ",
    "x",
]


def eval_lines() -> list[str]:
    """A few hundred lines of mixed text: shipped corpora, code, handwritten, random unicode."""
    tiny = corpus.read_documents("bible,wordnet", "validation", data_dir="data/tiny")
    code = corpus.read_documents("sympy", "validation")
    lines = [line for doc in tiny[:60] for line in doc.split("\n")][:160]
    lines += [line for doc in code[:20] for line in doc.split("\n")][:120]
    rng = random.Random(3)
    lines += [random_unicode(rng, rng.randint(1, 40)) for _ in range(60)]
    return lines + HANDWRITTEN + make_corpus(30, seed=5)


@pytest.fixture(scope="module")
def lines() -> list[str]:
    return eval_lines()


@pytest.fixture(scope="module")
def train_lines() -> list[str]:
    tiny = corpus.read_documents("bible,wordnet", "train", data_dir="data/tiny")
    code = corpus.read_documents("sympy", "train")[:150]
    return [line for doc in tiny + code for line in doc.split("\n") if line.strip()]


def hf_save(backend: Backend, cls: type, path, **kwargs) -> str:
    cls(tokenizer_object=backend, **kwargs).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def gpt2_dir(train_lines, tmp_path_factory) -> str:
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(train_lines, trainer)
    path = tmp_path_factory.mktemp("gpt2")
    return hf_save(backend, transformers.GPT2TokenizerFast, path)


@pytest.fixture(scope="module")
def bert_dir(train_lines, tmp_path_factory) -> str:
    backend = Backend(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(
        vocab_size=1200, special_tokens=specials, show_progress=False
    )
    backend.train_from_iterator(train_lines, trainer)
    path = tmp_path_factory.mktemp("bert")
    cls = transformers.BertTokenizerFast
    return hf_save(backend, cls, path, do_lower_case=True, strip_accents=True)


@pytest.fixture(scope="module")
def llama_dir(train_lines, tmp_path_factory) -> str:
    """Llama-2 style: <unk> <s> </s>, the 256 byte pieces, then BPE pieces over '▁'-joined text
    (normaliser: prepend '▁', spaces to '▁'), byte fallback for unknown characters."""
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained = Backend(models.BPE())
    trained.normalizer = normalizer
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=900, special_tokens=specials, max_token_length=12, show_progress=False
    )
    trained.train_from_iterator(train_lines, trainer)
    model = json.loads(trained.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [p for p, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    vocab = {}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    backend = Backend(
        models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    backend.normalizer = normalizer
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    path = tmp_path_factory.mktemp("llama")
    cls = transformers.LlamaTokenizerFast
    return hf_save(backend, cls, path, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def t5_dir(train_lines, tmp_path_factory) -> str:
    """T5's layout: SentencePiece unigram (nmt_nfkc, dummy prefix) with pad 0, eos 1, unk 2, no
    bos; T5Tokenizer adds the 100 sentinels above the pieces."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(train_lines[:2000]),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=700,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    source = tmp_path_factory.mktemp("t5_source") / "spiece.model"
    source.write_bytes(buffer.getvalue())
    path = tmp_path_factory.mktemp("t5")
    transformers.T5Tokenizer(str(source), extra_ids=100, legacy=True).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def t5_fast_dir(t5_dir, tmp_path_factory) -> str:
    """The same T5 tokenizer converted by transformers to tokenizer.json (next to spiece.model)."""
    path = tmp_path_factory.mktemp("t5_fast")
    transformers.T5TokenizerFast.from_pretrained(t5_dir).save_pretrained(path)
    assert os.path.exists(path / "tokenizer.json")
    return str(path)


@pytest.fixture(scope="module")
def kiln_bpe(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("kiln_bpe") / "tokenizer.model"
    return train_tokenizer(make_corpus(), path, vocab_size=1000)


@pytest.fixture(scope="module")
def kiln_unigram(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("kiln_unigram") / "tokenizer.model"
    return train_tokenizer(make_corpus(), path, vocab_size=800, model_type="unigram")
