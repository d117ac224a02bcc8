"""Hugging Face tokenizer directories, served with kiln's tokenizer interface.

Two kinds of directory (what ``save_pretrained`` writes, and what hub checkpoints ship):

* ``tokenizer.json``: a fast tokenizer (GPT-2 byte-level BPE, BERT WordPiece, Llama BPE with
  byte fallback, T5 unigram, ...) run by the ``tokenizers`` library: :class:`HFTokenizer`.
* ``spiece.model`` without ``tokenizer.json``: T5's SentencePiece model, run by sentencepiece
  as transformers' ``T5Tokenizer`` runs it: `kiln.data.t5_tokenizer.T5SentencePieceTokenizer`.

The special tokens and their roles come from ``tokenizer_config.json`` and
``special_tokens_map.json`` (read as transformers reads them; the tokenizer class's defaults,
e.g. GPT-2's ``<|endoftext|>``, fill the roles a config leaves out), so the ids equal
``transformers.AutoTokenizer.from_pretrained(directory)``'s without special tokens added.
Text that literally contains a special token's string (``"</s>"``) encodes to its id, as in
transformers, unless the config sets ``split_special_tokens``.

A role the tokenizer does not have is ``None`` (GPT-2 has no mask, cls or sep), with two
exceptions: ``pad_id`` falls back to ``eos_id`` when there is no pad token (GPT-2, Llama), and a
T5 tokenizer's ``bos_id`` is its pad id, because kiln starts decoder inputs with ``bos_id`` and
T5 starts them with pad (``decoder_start_token_id = 0``). GPT-2's bos and eos are both
``<|endoftext|>``. ``sentinel_ids`` are the ids of ``<extra_id_0>``, ``<extra_id_1>``, ... in
that order (T5: ``<extra_id_0>`` is the highest id), empty when there are none.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken
from tokenizers import Tokenizer as TokenizersModel

from kiln.errors import KilnError

TOKENIZER_JSON = "tokenizer.json"
SPIECE = "spiece.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# Every file of a tokenizer directory kiln copies (never the weights beside them).
FILES = (
    TOKENIZER_JSON,
    SPIECE,
    TOKENIZER_CONFIG,
    SPECIAL_TOKENS_MAP,
    "added_tokens.json",
    # Slow tokenizers' vocabularies: not read by kiln, kept for transformers' slow classes.
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
)
ROLES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")  # transformers' order
SENTINEL = re.compile(r"<extra_id_(\d+)>")
# What transformers' classes default to when a config names no token for a role.
_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "GPT2Tokenizer": {"unk": "<|endoftext|>", "bos": "<|endoftext|>", "eos": "<|endoftext|>"},
    "BertTokenizer": {
        "unk": "[UNK]",
        "sep": "[SEP]",
        "pad": "[PAD]",
        "cls": "[CLS]",
        "mask": "[MASK]",
    },
    "T5Tokenizer": {"eos": "</s>", "unk": "<unk>", "pad": "<pad>"},
    "LlamaTokenizer": {"unk": "<unk>", "bos": "<s>", "eos": "</s>"},
}
# A checkpoint's config.json model_type -> tokenizer class, for configs that name no class.
_MODEL_TYPE_CLASS = {
    "gpt2": "GPT2Tokenizer",
    "bert": "BertTokenizer",
    "t5": "T5Tokenizer",
    "llama": "LlamaTokenizer",
}


def copy_files(source: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copies the tokenizer files (`FILES`) of directory ``source`` into directory ``dest``,
    each atomically; other files in ``dest`` (a checkpoint's weights) are left alone.

    When the source's tokenizer_config.json names no tokenizer class, the copy's names the one
    of the source's config.json ``model_type``, so the copy loads without config.json.
    """
    source, dest = Path(source), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if dest.resolve() == source.resolve():
        return
    for name in FILES:
        if (source / name).is_file():
            write_atomically(dest / name, (source / name).read_bytes())
    config = _read_json(source / TOKENIZER_CONFIG) if (source / TOKENIZER_CONFIG).is_file() else {}
    if "tokenizer_class" not in config and (cls := _class_from_model_config(source)):
        text = json.dumps({**config, "tokenizer_class": cls}, indent=2, ensure_ascii=False)
        write_atomically(dest / TOKENIZER_CONFIG, text.encode())


def write_atomically(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file, so readers never see half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main_file(path: str | os.PathLike) -> Path:
    """The file that defines a tokenizer directory's vocabulary (tokenizer.json or spiece.model)."""
    path = Path(path)
    return path / TOKENIZER_JSON if (path / TOKENIZER_JSON).is_file() else path / SPIECE


def read_config(path: Path) -> dict[str, Any]:
    """tokenizer_config.json with special_tokens_map.json merged in the way transformers does
    (the map overrides, unless the config lists ``added_tokens_decoder``), and
    ``tokenizer_class`` set (without "Fast"; from config.json's ``model_type`` if missing)."""
    config = _read_json(path / TOKENIZER_CONFIG) if (path / TOKENIZER_CONFIG).is_file() else {}
    if "added_tokens_decoder" not in config and (path / SPECIAL_TOKENS_MAP).is_file():
        for key, value in _read_json(path / SPECIAL_TOKENS_MAP).items():
            if key == "additional_special_tokens":
                old = config.get(key) or []
                known = [token_content(v) for v in old]
                value = old + [v for v in value if token_content(v) not in known]
            config[key] = value
    cls = config.get("tokenizer_class") or _class_from_model_config(path) or ""
    config["tokenizer_class"] = cls.removesuffix("Fast")
    return config


def _class_from_model_config(path: Path) -> str | None:
    if not (path / "config.json").is_file():
        return None
    return _MODEL_TYPE_CLASS.get(_read_json(path / "config.json").get("model_type"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise KilnError(
            f"Cannot read {path}: {e}. Restore the file or re-save the tokenizer."
        ) from e
    if not isinstance(data, dict):
        raise KilnError(f"{path} holds a {type(data).__name__}, expected a JSON object.")
    return data


def token_content(value: Any) -> str | None:
    """A special token's string, from a config value (a string, an AddedToken dict or None)."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def role_tokens(config: dict[str, Any]) -> dict[str, str | None]:
    """Role -> token string, from the config, else the tokenizer class's default."""
    defaults = _CLASS_DEFAULTS.get(config["tokenizer_class"], {})
    return {role: token_content(config.get(f"{role}_token", defaults.get(role))) for role in ROLES}


def resolve_roles(ids: dict[str, int | None], t5_style: bool) -> dict[str, int | None]:
    """The role ids with kiln's fallbacks: pad -> eos; a T5 tokenizer's bos -> pad."""
    ids = dict(ids)
    if ids["pad"] is None:
        ids["pad"] = ids["eos"]
    if t5_style and ids["bos"] is None:
        ids["bos"] = ids["pad"]
    return ids


class RoleIds:
    """The role ids of kiln's tokenizer interface, from a ``_ids`` dict and ``_sentinels``."""

    _ids: dict[str, int | None]
    _sentinels: tuple[int, ...]
    _path: Path

    @property
    def path(self) -> Path:
        """The directory this tokenizer was loaded from."""
        return self._path

    @property
    def pad_id(self) -> int | None:
        """The pad token's id; the eos id when the tokenizer defines no pad token."""
        return self._ids["pad"]

    @property
    def unk_id(self) -> int | None:
        return self._ids["unk"]

    @property
    def bos_id(self) -> int | None:
        """The bos token's id; for T5 the pad id (its decoder start), which kiln starts with."""
        return self._ids["bos"]

    @property
    def eos_id(self) -> int | None:
        return self._ids["eos"]

    @property
    def mask_id(self) -> int | None:
        return self._ids["mask"]

    @property
    def cls_id(self) -> int | None:
        return self._ids["cls"]

    @property
    def sep_id(self) -> int | None:
        return self._ids["sep"]

    @property
    def sentinel_ids(self) -> tuple[int, ...]:
        """The ids of ``<extra_id_0>``, ``<extra_id_1>``, ..., in that order."""
        return self._sentinels

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={str(self._path)!r}, vocab_size={self.vocab_size})"


def find_sentinels(vocab: dict[str, int]) -> tuple[int, ...]:
    """The ids of ``<extra_id_0>``, ``<extra_id_1>``, ... up to the first one missing."""
    numbered = {int(m[1]): i for token, i in vocab.items() if (m := SENTINEL.fullmatch(token))}
    ids = []
    while len(ids) in numbered:
        ids.append(numbered[len(ids)])
    return tuple(ids)


class HFTokenizer(RoleIds):
    """A ``tokenizer.json`` directory run by the ``tokenizers`` library (module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self._path = Path(path)
        config = read_config(self._path)
        self._tok = _load_backend(self._path / TOKENIZER_JSON, config)
        roles = role_tokens(config)
        _add_config_tokens(self._tok, config, roles)
        self._tok.encode_special_tokens = bool(config.get("split_special_tokens", False))
        self._sentinels = find_sentinels(self._tok.get_vocab(with_added_tokens=True))
        ids = {role: None if t is None else self._tok.token_to_id(t) for role, t in roles.items()}
        t5_style = config["tokenizer_class"] == "T5Tokenizer" or bool(self._sentinels)
        self._ids = resolve_roles(ids, t5_style)

    @property
    def backend(self) -> TokenizersModel:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce: its vocabulary plus added tokens (``len`` of the
        transformers tokenizer); a model's embedding may have more rows."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        piece = self._tok.id_to_token(int(token_id))
        if piece is None:
            raise IndexError(f"id {token_id} is out of range for {self!r}")
        return piece

    def encode(self, text: str) -> list[int]:
        """Encodes text to ids without adding special tokens (no bos/eos, no [CLS]/[SEP])."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Decodes ids to text, dropping special tokens (pad, bos, eos, ...)."""
        flat = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self._tok.decode(flat, skip_special_tokens=True)


def _load_backend(path: Path, config: dict[str, Any]) -> TokenizersModel:
    """tokenizer.json, with the settings transformers applies on loading: the config's
    lower-casing/accent options for BERT's normaliser, ``add_prefix_space``, no truncation or
    padding."""
    data = _read_json(path)
    normalizer = data.get("normalizer") or {}
    if normalizer.get("type") == "BertNormalizer" and config["tokenizer_class"] == "BertTokenizer":
        normalizer["lowercase"] = config.get("do_lower_case", True)
        normalizer["strip_accents"] = config.get("strip_accents")
        normalizer["handle_chinese_chars"] = config.get("tokenize_chinese_chars", True)
    pre_tokenizer = data.get("pre_tokenizer") or {}
    if "add_prefix_space" in pre_tokenizer:
        pre_tokenizer["add_prefix_space"] = config.get("add_prefix_space", False)
    try:
        tok = TokenizersModel.from_str(json.dumps(data))
    except Exception as e:  # tokenizers raises a plain Exception on a bad file.
        raise KilnError(
            f"{path} is not a tokenizer.json the tokenizers library can read ({e}). Re-save it "
            "with transformers' save_pretrained."
        ) from e
    tok.no_truncation()
    tok.no_padding()
    return tok


def _add_config_tokens(
    tok: TokenizersModel, config: dict[str, Any], roles: dict[str, str | None]
) -> None:
    """Adds the config's added and special tokens the tokenizer.json lacks, as transformers does
    on loading (so they split text and get the same ids)."""
    present = {t.content: t for t in tok.get_added_tokens_decoder().values()}
    listed = config.get("added_tokens_decoder") or {}
    for _, entry in sorted(listed.items(), key=lambda item: int(item[0])):
        token = AddedToken(**{k: v for k, v in entry.items() if not k.startswith("__")})
        old = present.get(token.content)
        if old is None or repr(old) != repr(token):
            tok.add_tokens([token])
            present[token.content] = token
    extra = [token_content(t) for t in config.get("additional_special_tokens") or []]
    for content in [*roles.values(), *extra]:
        if content is not None and content not in present:
            token = AddedToken(content, special=True, normalized=False)
            tok.add_tokens([token])
            present[content] = token
