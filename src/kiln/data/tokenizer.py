"""Tokenizers: kiln's own SentencePiece models, Hugging Face tokenizer directories, and export.

:func:`load_tokenizer` reads kiln's ``tokenizer.model`` (a :class:`Tokenizer`, below) or a
Hugging Face tokenizer directory (``tokenizer.json`` or T5's ``spiece.model``; see
`kiln.data.hf_tokenizer`). Every tokenizer has the same interface: ``vocab_size``, the role ids
``pad_id``, ``unk_id``, ``bos_id``, ``eos_id``, ``mask_id``, ``cls_id``, ``sep_id`` (``None``
where an imported tokenizer lacks the role, but ``pad_id`` falls back to eos and T5's
``bos_id`` is its pad id), ``sentinel_ids``, ``encode`` (no special tokens added),
``encode_batch``, ``decode`` (special tokens dropped), ``id_to_piece`` and ``path``.
:func:`save_tokenizer` writes any of them as a directory that both :func:`load_tokenizer` and
``transformers.AutoTokenizer`` load with the same ids.

Every kiln-trained tokenizer has the same layout at the start of its vocabulary:

====== ==========================================
id     piece
====== ==========================================
0      ``<pad>`` (control)
1      ``<unk>``
2      ``<s>`` (bos, control)
3      ``</s>`` (eos, control)
4      ``[MASK]`` (control)
5      ``[CLS]`` (control)
6      ``[SEP]`` (control)
7-106  ``<extra_id_0>`` .. ``<extra_id_99>`` (T5 sentinels, control)
====== ==========================================

then the 256 byte-fallback pieces ``<0x00>`` .. ``<0xFF>`` and the learned pieces.

All special pieces except ``<unk>`` are *control* symbols: encoding text never produces them,
even when the text literally contains ``"[MASK]"`` or ``"<extra_id_0>"`` (such text is encoded as
ordinary characters), and decoding drops them. Objectives insert them by id. Byte fallback means
``<unk>`` is never produced either.

Normalisation is the identity and whitespace is kept as is, so ``decode(encode(s)) == s`` for
every string, with one caveat: SentencePiece uses U+2581 (``▁``) to stand for a space, so that
character decodes as a space.
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from kiln.data import hf_tokenizer, spm_to_json
from kiln.data.hf_tokenizer import HFTokenizer
from kiln.data.t5_tokenizer import T5SentencePieceTokenizer
from kiln.errors import KilnError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
NUM_SENTINELS = 100
CONTROL_SYMBOLS = ("[MASK]", "[CLS]", "[SEP]") + tuple(
    f"<extra_id_{i}>" for i in range(NUM_SENTINELS)
)
NUM_SPECIAL_IDS = 4 + len(CONTROL_SYMBOLS)  # 107
NUM_BYTE_PIECES = 256
MIN_LEARNED_PIECES = 128
MIN_VOCAB_SIZE = NUM_SPECIAL_IDS + NUM_BYTE_PIECES + MIN_LEARNED_PIECES  # 491
MODEL_TYPES = ("bpe", "unigram")
# Fixed so that the trained model does not depend on the machine's core count (unigram
# training results depend on the number of threads).
_TRAIN_THREADS = 16
_MAX_LINE_BYTES = 1 << 16
_ROLE_NAMES = ("pad", "unk", "bos", "eos", "mask", "cls", "sep")


class Tokenizer:
    """A kiln-trained SentencePiece model with kiln's special ids (see the module docstring)."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: str | os.PathLike):
        self._sp = processor
        self._path = Path(path)
        _check_layout(processor, self._path)

    @property
    def processor(self) -> spm.SentencePieceProcessor:
        """The underlying SentencePieceProcessor."""
        return self._sp

    @property
    def path(self) -> Path:
        """The model file this tokenizer was written to or loaded from."""
        return self._path

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def mask_id(self) -> int:
        return 4

    @property
    def cls_id(self) -> int:
        return 5

    @property
    def sep_id(self) -> int:
        return 6

    @property
    def sentinel_ids(self) -> tuple[int, ...]:
        """The ids of ``<extra_id_0>`` .. ``<extra_id_99>``, in that order."""
        return tuple(range(7, 7 + NUM_SENTINELS))

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def encode(self, text: str) -> list[int]:
        """Encodes text to ids, without bos/eos; never emits special ids."""
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Decodes ids to text, dropping pad, bos, eos and the other control ids."""
        return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self._path)!r}, vocab_size={self.vocab_size})"


def _check_layout(sp: spm.SentencePieceProcessor, path: Path) -> None:
    expected = ["<pad>", "<unk>", "<s>", "</s>", *CONTROL_SYMBOLS]
    actual = [sp.id_to_piece(i) for i in range(min(len(expected), sp.get_piece_size()))]
    if actual != expected or sp.id_to_piece(NUM_SPECIAL_IDS) != "<0x00>":
        raise KilnError(
            f"{path} is not a kiln tokenizer: its first pieces are {actual[:8]}..., expected "
            f"{expected[:8]}... followed by byte pieces. Train it with kiln.data.train_tokenizer "
            "(or delete it so the run trains a new one)."
        )


def _sample_lines(texts: Iterable[str], max_lines: int, seed: int) -> list[str]:
    """The non-empty lines of ``texts``, or a uniform sample of ``max_lines`` of them."""
    rng = random.Random(seed)
    sample: list[str] = []
    n = 0
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            if n < max_lines:
                sample.append(line)
            elif (j := rng.randrange(n + 1)) < max_lines:
                sample[j] = line
            n += 1
    return sample


def train_tokenizer(
    texts: Iterable[str],
    path: str | os.PathLike,
    *,
    vocab_size: int,
    model_type: str = "bpe",
    max_sentences: int = 2_000_000,
    seed: int = 0,
) -> Tokenizer:
    """Trains a SentencePiece model on ``texts`` and writes it to ``path``.

    Texts are split into lines; empty lines are skipped. At most ``max_sentences`` lines are used:
    a uniform sample drawn with ``seed`` when there are more (done here, as SentencePiece 0.2.3
    ignores its seed). Same texts and settings give the same model file, byte for byte.

    Args:
        texts: Training documents.
        path: Where to write the model, e.g. ``<workdir>/tokenizer.model``.
        vocab_size: Total vocabulary size, specials and byte pieces included.
        model_type: ``"bpe"`` or ``"unigram"``.
        max_sentences: Maximum number of lines to train on.
        seed: Seed for sampling the lines.

    Returns:
        The trained tokenizer.

    Raises:
        KilnError: On an unknown model type, a vocabulary too small or too large for the data,
            or no text.
    """
    if model_type not in MODEL_TYPES:
        raise KilnError(
            f"tokenizer.model_type={model_type!r} is not supported: use one of {MODEL_TYPES}."
        )
    if vocab_size < MIN_VOCAB_SIZE:
        raise KilnError(
            f"model.vocab_size={vocab_size} is too small: it must be at least "
            f"{MIN_VOCAB_SIZE} ({NUM_SPECIAL_IDS} special ids + {NUM_BYTE_PIECES} byte pieces + "
            f"{MIN_LEARNED_PIECES} learned pieces). Increase model.vocab_size."
        )
    if max_sentences < 1:
        raise KilnError(f"tokenizer.max_sentences={max_sentences} must be >= 1.")
    lines = _sample_lines(texts, max_sentences, seed)
    if not lines:
        raise KilnError("No text to train the tokenizer on: the training documents are empty.")

    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=buffer,
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=0.9995,
            byte_fallback=True,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            control_symbols=list(CONTROL_SYMBOLS),
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            max_sentence_length=_MAX_LINE_BYTES,
            num_threads=_TRAIN_THREADS,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise KilnError(
            f"Training the tokenizer with model.vocab_size={vocab_size} failed: {e}. "
            "Adjust model.vocab_size to fit the training text."
        ) from e
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
    return Tokenizer(spm.SentencePieceProcessor(model_proto=buffer.getvalue()), path)


# Any tokenizer load_tokenizer returns: they share the interface of the module docstring.
AnyTokenizer = Tokenizer | HFTokenizer | T5SentencePieceTokenizer


def load_tokenizer(path: str | os.PathLike) -> AnyTokenizer:
    """Loads a tokenizer: kiln's ``tokenizer.model`` (written by :func:`train_tokenizer`), or a
    Hugging Face tokenizer directory (``tokenizer.json``, or T5's ``spiece.model``; naming
    either file also loads its directory).

    Raises:
        KilnError: If the path is missing, is a directory without either file, or a
            ``.model`` file is not a kiln tokenizer.
    """
    path = Path(path)
    if path.is_dir():
        return _load_directory(path)
    if path.name in (hf_tokenizer.TOKENIZER_JSON, hf_tokenizer.SPIECE) and path.is_file():
        return _load_directory(path.parent)
    if not path.is_file():
        raise KilnError(
            f"No tokenizer at {path}: expected the tokenizer.model of the run in "
            f"{path.parent}. Check the workdir (or init_from) names a run that trained its "
            "tokenizer, or let this run train one."
        )
    try:
        processor = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise KilnError(f"{path} is not a valid SentencePiece model ({e}); delete it.") from e
    return Tokenizer(processor, path)


def _load_directory(path: Path) -> HFTokenizer | T5SentencePieceTokenizer:
    """A Hugging Face tokenizer directory: tokenizer.json first, else spiece.model."""
    if (path / hf_tokenizer.TOKENIZER_JSON).is_file():
        return HFTokenizer(path)
    if (path / hf_tokenizer.SPIECE).is_file():
        return T5SentencePieceTokenizer(path)
    raise KilnError(
        f"No tokenizer in the directory {path}: expected {hf_tokenizer.TOKENIZER_JSON} (a Hugging"
        f" Face fast tokenizer) or {hf_tokenizer.SPIECE} (T5's SentencePiece model), with"
        f" {hf_tokenizer.TOKENIZER_CONFIG}. Point at a save_pretrained directory or at kiln's"
        " tokenizer.model."
    )


def save_tokenizer(tokenizer: AnyTokenizer, directory: str | os.PathLike) -> None:
    """Writes ``tokenizer`` into ``directory`` (created if needed; other files there are kept)
    so that :func:`load_tokenizer` and ``transformers.AutoTokenizer.from_pretrained`` load it
    with the same ids and special tokens.

    An imported tokenizer's files are copied. A kiln tokenizer is written as ``tokenizer.json``
    (rebuilt from the SentencePiece model, `kiln.data.spm_to_json`) with
    ``tokenizer_config.json`` and ``special_tokens_map.json`` naming its special tokens; its
    config sets ``split_special_tokens`` so that, as in kiln, text never encodes to a special id.

    Raises:
        KilnError: If the tokenizer is of no known kind or its model cannot be exported.
    """
    directory = Path(directory)
    if isinstance(tokenizer, HFTokenizer | T5SentencePieceTokenizer):
        hf_tokenizer.copy_files(tokenizer.path, directory)
        return
    if not isinstance(tokenizer, Tokenizer):
        raise KilnError(
            f"Cannot save {tokenizer!r}: save_tokenizer takes a tokenizer from load_tokenizer "
            "or train_tokenizer."
        )
    proto = spm_to_json.parse_model(tokenizer.processor.serialized_model_proto())
    backend = spm_to_json.to_tokenizer(proto, str(tokenizer.path))
    directory.mkdir(parents=True, exist_ok=True)
    tokens = {
        f"{role}_token": tokenizer.id_to_piece(getattr(tokenizer, f"{role}_id"))
        for role in _ROLE_NAMES
    }
    tokens["additional_special_tokens"] = [tokenizer.id_to_piece(i) for i in tokenizer.sentinel_ids]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **tokens,
        "split_special_tokens": True,  # kiln never encodes text to a special id
        "clean_up_tokenization_spaces": False,  # decode gives the text back as it was
    }
    files = {
        hf_tokenizer.TOKENIZER_JSON: backend.to_str(),
        hf_tokenizer.TOKENIZER_CONFIG: json.dumps(config, indent=2, ensure_ascii=False),
        hf_tokenizer.SPECIAL_TOKENS_MAP: json.dumps(tokens, indent=2, ensure_ascii=False),
    }
    for name, text in files.items():
        hf_tokenizer.write_atomically(directory / name, text.encode())


def document_ids(tokenizer: AnyTokenizer) -> tuple[int, int]:
    """The ids that open and close a document in a packed pre-training row: bos and eos, else
    (a BERT WordPiece tokenizer has neither) [CLS] and [SEP]."""
    first = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.cls_id
    last = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.sep_id
    if first is None or last is None:
        raise KilnError(
            f"The tokenizer at {tokenizer.path} has no bos/eos (nor [CLS]/[SEP]) token to mark"
            " where a document starts and ends: use a tokenizer that defines them."
        )
    return first, last


def separator_id(tokenizer: AnyTokenizer) -> int:
    """The id between a prompt and its completion in a decoder row: [SEP], else eos (GPT-2 and
    Llama tokenizers have no [SEP])."""
    return tokenizer.sep_id if tokenizer.sep_id is not None else tokenizer.eos_id


def special_ids(tokenizer: AnyTokenizer) -> frozenset[int]:
    """Every id with a role (pad, unk, bos, eos, mask, cls, sep) or a sentinel: ids that text
    does not stand for (for kiln's layout exactly 0 .. NUM_SPECIAL_IDS - 1)."""
    roles = (getattr(tokenizer, f"{role}_id") for role in _ROLE_NAMES)
    return frozenset(i for i in (*roles, *tokenizer.sentinel_ids) if i is not None)
