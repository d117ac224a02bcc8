"""T5's ``spiece.model`` directories, served with kiln's tokenizer interface (see
`kiln.data.hf_tokenizer` for the roles and the transformers behaviour this reproduces)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from kiln.data.hf_tokenizer import (
    SENTINEL,
    SPIECE,
    RoleIds,
    find_sentinels,
    read_config,
    resolve_roles,
    role_tokens,
    token_content,
)
from kiln.errors import KilnError


class T5SentencePieceTokenizer(RoleIds):
    """T5's ``spiece.model`` (pad 0, eos 1, unk 2; ``extra_ids`` sentinels above the pieces,
    ``<extra_id_0>`` the highest id), encoded as transformers' ``T5Tokenizer`` encodes in its
    default (legacy) mode: text is split at special token strings and each part is encoded by
    SentencePiece. (With ``"legacy": false`` transformers differs for the text right after a
    special token string.)"""

    def __init__(self, path: str | os.PathLike):
        self._path = Path(path)
        config = read_config(self._path)
        self._sp = _load_sentencepiece(self._path / SPIECE)
        n = self._sp.get_piece_size()
        tokens = role_tokens({**config, "tokenizer_class": "T5Tokenizer"})
        added = _t5_added_tokens(config, self._sp, tokens)
        self._added = {content: token_id for content, (token_id, _, _) in added.items()}
        self._added_pieces = {token_id: content for content, token_id in self._added.items()}
        self._strip = {content: strips for content, (_, *strips) in added.items()}
        by_length = sorted(self._added, key=len, reverse=True)
        self._split = re.compile("|".join(map(re.escape, by_length))) if by_length else None
        self._vocab_size = max([n, *(i + 1 for i in self._added.values())])
        self._sentinels = find_sentinels(self._added)
        ids = {role: None if t is None else self._piece_id(t) for role, t in tokens.items()}
        self._ids = resolve_roles(ids, t5_style=True)
        self._special = frozenset(self._added.values()) | {i for i in ids.values() if i is not None}

    def _piece_id(self, token: str) -> int:
        if token in self._added:
            return self._added[token]
        return self._sp.piece_to_id(token)

    @property
    def vocab_size(self) -> int:
        """SentencePiece's pieces plus the sentinels (``len`` of transformers' T5Tokenizer)."""
        return self._vocab_size

    def id_to_piece(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id in self._added_pieces:
            return self._added_pieces[token_id]
        return self._sp.id_to_piece(token_id)

    def encode(self, text: str) -> list[int]:
        """Encodes text to ids without adding eos (a literal special token string is its id)."""
        if self._split is None or not self._split.search(text):
            return self._sp.encode(text)
        ids: list[int] = []
        for part, special in self._parts(text):
            ids.extend([self._added[part]] if special else self._sp.encode(part))
        return ids

    def _parts(self, text: str) -> list[tuple[str, bool]]:
        """Text split at special token strings: (part, is special), honouring their lstrip and
        rstrip (which eat the whitespace beside them); empty parts dropped."""
        parts: list[tuple[str, bool]] = []
        pos = 0
        for match in self._split.finditer(text):
            parts += [(text[pos : match.start()], False), (match.group(), True)]
            pos = match.end()
        parts.append((text[pos:], False))
        for k, (part, special) in enumerate(parts):
            if special:
                lstrip, rstrip = self._strip[part]
                if lstrip and k > 0:
                    parts[k - 1] = (parts[k - 1][0].rstrip(), False)
                if rstrip and k + 1 < len(parts):
                    parts[k + 1] = (parts[k + 1][0].lstrip(), False)
        return [(p, s) for p, s in parts if p]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Decodes ids to text, dropping pad, eos, unk and the sentinels."""
        flat = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self._sp.decode([i for i in flat if i not in self._special])


def _load_sentencepiece(path: Path) -> spm.SentencePieceProcessor:
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise KilnError(f"{path} is not a valid SentencePiece model ({e}).") from e


def _t5_added_tokens(
    config: dict[str, Any], sp: spm.SentencePieceProcessor, roles: dict[str, str | None]
) -> dict[str, tuple[int, bool, bool]]:
    """content -> (id, lstrip, rstrip) of the tokens transformers' T5Tokenizer splits text at:
    the config's ``added_tokens_decoder``, else pad/eos/unk and ``extra_ids`` sentinels."""
    listed = config.get("added_tokens_decoder")
    if listed:
        return {
            e["content"]: (int(i), bool(e.get("lstrip")), bool(e.get("rstrip")))
            for i, e in listed.items()
        }
    n, extra = sp.get_piece_size(), int(config.get("extra_ids", 100))
    names = [token_content(t) for t in config.get("additional_special_tokens") or []]
    names = names or [f"<extra_id_{i}>" for i in range(extra)]
    added = {}
    for name in names:
        if (m := SENTINEL.fullmatch(name or "")) and int(m[1]) < extra:
            added[name] = (n + extra - 1 - int(m[1]), False, False)
    for role in ("pad", "eos", "unk"):
        if roles[role] is not None:
            added.setdefault(roles[role], (sp.piece_to_id(roles[role]), False, False))
    return added
