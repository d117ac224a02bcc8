"""A SentencePiece model rebuilt as a Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``).

Used to export kiln's own tokenizers (`kiln.data.tokenizer.save_tokenizer`). The rebuilt
tokenizer gives the same ids as SentencePiece for models trained the way kiln trains them:
identity normalisation, no dummy prefix, whitespace kept, byte fallback.

* BPE: SentencePiece merges, at each step, the adjacent pair whose concatenation is the
  best-scoring piece of the vocabulary. The merges list below holds every split of every
  ordinary piece into two ordinary pieces, ranked by the score of the piece it makes, so the
  ``tokenizers`` BPE model picks the same piece at each step. Control and byte pieces are never
  the result of a merge, so text never produces them.
* Unigram: the pieces and scores as they are. ``tokenizers`` has no piece types, so control
  and byte pieces, which SentencePiece never matches in text, could match a literal ``"[MASK]"``
  or ``"<0x41>"``. Two measures keep them out of the Viterbi path: they score far below any
  ordinary piece (so spelling the string with ordinary pieces wins), and every character of
  theirs that no ordinary piece contains is split off the text before the model runs (so a
  string that cannot be spelled with ordinary pieces cannot be matched either). The split
  changes nothing else: SentencePiece too encodes such a character alone (as byte pieces).
  (SentencePiece keeps every character of an ordinary piece as a piece of its own, so the
  first measure covers the rest.)

Spaces become ``▁`` (U+2581) as in SentencePiece, and decoding turns ``▁`` back into spaces
and byte pieces back into UTF-8.
"""

from __future__ import annotations

from collections.abc import Iterable

from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizerModel

from kiln.errors import KilnError

# SentencePiece's piece types and model types (sentencepiece_model.proto).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_UNIGRAM, _BPE = 1, 2
_SPACE = "\u2581"
# How far below the worst ordinary piece control and byte pieces score (unigram). Larger than
# any sum of ordinary scores over the longest control piece (13 characters).
_NEVER = 1e6


def parse_model(serialized: bytes) -> sentencepiece_model_pb2.ModelProto:
    """A SentencePiece model file's contents as its protocol buffer."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(serialized)
    return proto


def to_tokenizer(proto: sentencepiece_model_pb2.ModelProto, where: str) -> HFTokenizerModel:
    """The ``tokenizers`` equivalent of a kiln-style SentencePiece model (see the module
    docstring); ``where`` names the model in errors.

    Raises:
        KilnError: If the model normalises text, adds a dummy prefix, collapses whitespace,
            lacks byte fallback, or is neither BPE nor unigram: only kiln's settings are
            reproduced.
    """
    _check_supported(proto, where)
    pieces = list(proto.pieces)
    unk_id = next(i for i, p in enumerate(pieces) if p.type == _UNKNOWN)
    if proto.trainer_spec.model_type == _BPE:
        tokenizer = HFTokenizerModel(_bpe(pieces, unk_id))
    else:
        tokenizer = HFTokenizerModel(_unigram(pieces, unk_id))
        if loose := _unspellable_characters(pieces):
            splits = [pre_tokenizers.Split(c, behavior="isolated") for c in loose]
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence(splits)
    tokenizer.normalizer = normalizers.Replace(" ", _SPACE)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    specials = [p.piece for p in pieces if p.type in (_CONTROL, _UNKNOWN)]
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tokenizer


def _check_supported(proto: sentencepiece_model_pb2.ModelProto, where: str) -> None:
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    problems = []
    if trainer.model_type not in (_BPE, _UNIGRAM):
        problems.append(f"model_type {trainer.model_type} (only bpe and unigram)")
    if norm.name != "identity" or norm.precompiled_charsmap:
        problems.append(f"normalization {norm.name!r} (only identity)")
    if norm.add_dummy_prefix or norm.remove_extra_whitespaces or not norm.escape_whitespaces:
        problems.append("whitespace handling other than kiln's")
    if not trainer.byte_fallback:
        problems.append("no byte fallback")
    if any(p.type in (_USER_DEFINED, _UNUSED) for p in proto.pieces):
        problems.append("user-defined or unused pieces")
    if problems:
        raise KilnError(
            f"Cannot export the SentencePiece model {where} as tokenizer.json: it has "
            f"{'; '.join(problems)}. Only tokenizers trained by kiln.data.train_tokenizer "
            "are exported this way."
        )


def _bpe(pieces: list, unk_id: int) -> models.BPE:
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    ordinary = {p.piece: i for i, p in enumerate(pieces) if p.type == _NORMAL}
    score = {p.piece: p.score for p in pieces}
    ranked = sorted(
        (-score[piece], ordinary[piece], ordinary[left], left, right)
        for piece, left, right in _splits(ordinary)
    )
    merges = [(left, right) for *_, left, right in ranked]
    return models.BPE(
        vocab, merges, unk_token=pieces[unk_id].piece, byte_fallback=True, fuse_unk=False
    )


def _splits(ordinary: dict[str, int]) -> Iterable[tuple[str, str, str]]:
    """Every (piece, left, right) with piece == left + right, all three ordinary pieces."""
    for piece in ordinary:
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in ordinary and right in ordinary:
                yield piece, left, right


def _unspellable_characters(pieces: list) -> list[str]:
    """The characters of control, unknown and byte pieces that no ordinary piece contains."""
    ordinary = {c for p in pieces if p.type == _NORMAL for c in p.piece}
    special = {c for p in pieces if p.type in (_CONTROL, _UNKNOWN, _BYTE) for c in p.piece}
    return sorted(special - ordinary)


def _unigram(pieces: list, unk_id: int) -> models.Unigram:
    worst = min((p.score for p in pieces if p.type == _NORMAL), default=0.0)
    vocab = [(p.piece, p.score if p.type == _NORMAL else worst - _NEVER) for p in pieces]
    return models.Unigram(vocab, unk_id=unk_id, byte_fallback=True)
