"""Tests for kiln.data.tokenizer."""

import pickle
import random

import pytest
import sentencepiece as spm

from kiln.data import tokenizer as tok_lib
from kiln.data.tokenizer import MIN_VOCAB_SIZE, Tokenizer, load_tokenizer, train_tokenizer
from kiln.errors import KilnError

_SUBJECTS = "the cat|a dog|my neighbour|the old sailor|our teacher|every child|the river".split("|")
_VERBS = "sees|likes|carries|paints|remembers|follows|builds|finds|watches|describes".split("|")
_OBJECTS = "a red ball|the mountain|three apples|the quiet town|a long letter|the bridge".split("|")
_EXTRAS = [
    "yesterday",
    "in the morning",
    "with great care",
    "— naïve café déjà vu",
    "東京で雨が降る",
    "북쪽 바람",
    "Привет, мир",
    "🙂 🚀",
    "and then: (x + y) * 2 = 42;",
    "\tindented\twith tabs",
]
_SYLLABLES = "ka ro mi tu ne sa li po da ve gri strom plen ath ing er ous ly tion qu".split()


def make_corpus(num_sentences: int = 1500, seed: int = 0) -> list[str]:
    """Generated English-like sentences with some unicode; about 100 KB."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4))) for _ in range(2000)]
    sentences = []
    for _ in range(num_sentences):
        parts = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
        parts += rng.choices(words, k=rng.randint(0, 8))
        if rng.random() < 0.3:
            parts.append(rng.choice(_EXTRAS))
        sentence = " ".join(parts).capitalize() + rng.choice([".", "!", "?", "..."])
        sentences.append(sentence)
    return sentences


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return make_corpus()


@pytest.fixture(scope="module")
def bpe(corpus, tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.model"
    return train_tokenizer(corpus, path, vocab_size=1000)


@pytest.fixture(scope="module")
def unigram(corpus, tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("unigram") / "tokenizer.model"
    return train_tokenizer(corpus, path, vocab_size=800, model_type="unigram")


def random_unicode(rng: random.Random, length: int) -> str:
    """Random code points from ASCII, Latin, CJK, emoji and higher planes; no surrogates.

    U+2581 is excluded: SentencePiece uses it for a space, so it decodes as " " (documented).
    """
    ranges = [
        (0x00, 0x7F),
        (0x80, 0x24F),
        (0x300, 0x36F),  # combining marks
        (0x400, 0x4FF),
        (0x3040, 0x30FF),
        (0x4E00, 0x9FFF),
        (0xAC00, 0xD7A3),
        (0xE000, 0xF8FF),  # private use
        (0xFB00, 0xFFFF),
        (0x1F300, 0x1FAFF),  # emoji
        (0x10000, 0x10FFFF),
    ]
    chars = []
    for _ in range(length):
        lo, hi = rng.choice(ranges)
        c = rng.randint(lo, hi)
        while 0xD800 <= c <= 0xDFFF or c == 0x2581:
            c = rng.randint(lo, hi)
        chars.append(chr(c))
    return "".join(chars)


@pytest.mark.parametrize("name", ["bpe", "unigram"])
def test_special_ids(name, request):
    tok = request.getfixturevalue(name)
    pieces = {
        tok.pad_id: "<pad>",
        tok.unk_id: "<unk>",
        tok.bos_id: "<s>",
        tok.eos_id: "</s>",
        tok.mask_id: "[MASK]",
        tok.cls_id: "[CLS]",
        tok.sep_id: "[SEP]",
    }
    assert sorted(pieces) == list(range(7))
    for i, piece in pieces.items():
        assert tok.id_to_piece(i) == piece
    assert tok.sentinel_ids == tuple(range(7, 107))
    for k, i in enumerate(tok.sentinel_ids):
        assert tok.id_to_piece(i) == f"<extra_id_{k}>"
    assert tok.id_to_piece(107) == "<0x00>"
    assert tok.id_to_piece(362) == "<0xFF>"
    assert tok.vocab_size == (1000 if name == "bpe" else 800)


@pytest.mark.parametrize("name", ["bpe", "unigram"])
def test_round_trip_random_unicode(name, request, corpus):
    tok = request.getfixturevalue(name)
    rng = random.Random(1)
    texts = [random_unicode(rng, rng.randint(0, 60)) for _ in range(300)]
    texts += corpus[:50] + ["  two  spaces\n\nnew lines\r\n\ttabs  ", "e\u0301 combining", ""]
    texts += ["literal [MASK] [CLS] [SEP] <extra_id_0> <s> </s> <pad> <unk> text"]
    for text, ids in zip(texts, tok.encode_batch(texts), strict=True):
        assert ids == tok.encode(text)
        # Byte fallback: never <unk>; control ids never come from text.
        assert all(i >= tok_lib.NUM_SPECIAL_IDS for i in ids), (text, ids)
        assert tok.decode(ids) == text


def test_decode_skips_control_ids(bpe):
    ids = bpe.encode("hello world")
    noisy = [bpe.bos_id, bpe.cls_id, *ids[:1], bpe.mask_id, *ids[1:], bpe.sentinel_ids[3]]
    noisy += [bpe.sep_id, bpe.eos_id, bpe.pad_id, bpe.pad_id]
    assert bpe.decode(noisy) == "hello world"


def test_compresses_training_text(bpe, corpus):
    text = corpus[0]
    assert len(bpe.encode(text)) < len(text.encode()) / 2


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_training_is_deterministic(corpus, tmp_path, model_type):
    def train(name: str, seed: int) -> bytes:
        path = tmp_path / name / "tokenizer.model"
        kwargs = dict(vocab_size=600, model_type=model_type, max_sentences=1000, seed=seed)
        train_tokenizer(corpus, path, **kwargs)
        return path.read_bytes()

    first = train("a", seed=0)
    assert train("b", seed=0) == first
    # max_sentences < number of lines: the seed picks the sample.
    assert train("c", seed=1) != first
    assert not list(tmp_path.glob("*/*.tmp"))


def test_save_load_and_pickle(bpe, corpus):
    loaded = load_tokenizer(bpe.path)
    assert loaded.path == bpe.path
    unpickled = pickle.loads(pickle.dumps(bpe))
    assert loaded.encode_batch(corpus[:100]) == bpe.encode_batch(corpus[:100])
    assert unpickled.encode_batch(corpus[:100]) == bpe.encode_batch(corpus[:100])


def test_too_small_vocab(corpus, tmp_path):
    with pytest.raises(KilnError, match=rf"model\.vocab_size=400.*{MIN_VOCAB_SIZE}"):
        train_tokenizer(corpus, tmp_path / "tokenizer.model", vocab_size=400)
    assert not (tmp_path / "tokenizer.model").exists()


def test_too_large_vocab(corpus, tmp_path):
    with pytest.raises(KilnError, match=r"model\.vocab_size=100000"):
        train_tokenizer(corpus[:50], tmp_path / "tokenizer.model", vocab_size=100_000)


def test_unknown_model_type(corpus, tmp_path):
    with pytest.raises(KilnError, match=r"tokenizer\.model_type='word'"):
        train_tokenizer(corpus, tmp_path / "tokenizer.model", vocab_size=1000, model_type="word")


def test_no_text(tmp_path):
    with pytest.raises(KilnError, match="empty"):
        train_tokenizer(["", "\n\n"], tmp_path / "tokenizer.model", vocab_size=1000)


def test_missing_file(tmp_path):
    path = tmp_path / "runs" / "gpt" / "tokenizer.model"
    with pytest.raises(KilnError, match=rf"{path}.*{path.parent}"):
        load_tokenizer(path)


def test_foreign_model_is_rejected(corpus, tmp_path):
    path = tmp_path / "plain.model"
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_writer=f, vocab_size=500, minloglevel=2
        )
    with pytest.raises(KilnError, match="not a kiln tokenizer"):
        load_tokenizer(path)
