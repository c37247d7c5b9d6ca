"""The vocabulary a GGUF file describes, read from its metadata and checked before anything trusts it.

GGUF stores a tokenizer as parallel arrays under llama.cpp's key names (`tokenizer.ggml.tokens`,
`.token_type`, `.scores`, `.merges`) plus special token ids and flags. `vocab_from_metadata` turns that
dict into a frozen `Vocab` and rejects inconsistent files with `GGUFError(source, field, reason)`, so the
tokenizer builders downstream can index the arrays without checking again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

from ..errors import GGUFError, UnsupportedError

SUPPORTED_MODELS = ("gpt2", "llama")

_KEY = "tokenizer.ggml."
_SPECIAL_ID_FIELDS = ("bos", "eos", "eot", "eom", "unknown", "padding")
_FLAG_FIELDS = ("add_bos_token", "add_eos_token", "add_space_prefix")


class TokenType(IntEnum):
    """`tokenizer.ggml.token_type` values (llama.cpp's llama_token_type)."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


@dataclass(frozen=True)
class Vocab:
    """A validated GGUF vocabulary: every id below is inside `tokens`, every array has one entry per token."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE with scores)
    pre: str | None  # tokenizer.ggml.pre, the pre-tokenizer name; None when the file has none
    tokens: tuple[str, ...]
    token_types: tuple[TokenType, ...]
    scores: tuple[float, ...] | None
    merges: tuple[tuple[str, str], ...]  # ranked best first; empty for "llama"
    bos_id: int | None = None
    eos_id: int | None = None
    eot_id: int | None = None
    eom_id: int | None = None
    unknown_id: int | None = None
    padding_id: int | None = None
    add_bos_token: bool | None = None  # None: the file does not say
    add_eos_token: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def __len__(self) -> int:
        return len(self.tokens)


def vocab_from_metadata(metadata: dict, source: str) -> Vocab:
    """Read and check the tokenizer part of a GGUF metadata dict; `source` names the file in errors."""
    if not isinstance(metadata, dict):
        raise GGUFError(source, "metadata", f"expected a dict of GGUF keys, got {type(metadata).__name__}")
    model = _string(metadata, _KEY + "model", source, required=True)
    if model not in SUPPORTED_MODELS:
        raise UnsupportedError(
            f"{source}: tokenizer model {model!r} is not supported; supported: {', '.join(SUPPORTED_MODELS)}")
    tokens = _tokens(metadata, source)
    n_tokens = len(tokens)
    token_types = _token_types(metadata, n_tokens, source)
    scores = _scores(metadata, n_tokens, source, required=model == "llama")
    merges = _merges(metadata, set(tokens), source) if model == "gpt2" else ()
    special_ids = {name: _token_id(metadata, name, n_tokens, source) for name in _SPECIAL_ID_FIELDS}
    flags = {name: _flag(metadata, name, source) for name in _FLAG_FIELDS}
    return Vocab(
        model=model,
        pre=_string(metadata, _KEY + "pre", source, required=False),
        tokens=tokens,
        token_types=token_types,
        scores=scores,
        merges=merges,
        **{f"{name}_id": value for name, value in special_ids.items()},
        **flags,
        chat_template=_string(metadata, "tokenizer.chat_template", source, required=False),
    )


def _string(metadata: dict, key: str, source: str, *, required: bool) -> str | None:
    value = metadata.get(key)
    if value is None:
        if required:
            raise GGUFError(source, key, "missing; the file carries no tokenizer")
        return None
    if not isinstance(value, str):
        raise GGUFError(source, key, f"expected a string, got {type(value).__name__}")
    return value


def _array(metadata: dict, key: str, source: str) -> list:
    value = metadata.get(key)
    if value is None:
        raise GGUFError(source, key, "missing")
    if not isinstance(value, (list, tuple)):
        raise GGUFError(source, key, f"expected an array, got {type(value).__name__}")
    return list(value)


def _tokens(metadata: dict, source: str) -> tuple[str, ...]:
    key = _KEY + "tokens"
    tokens = _array(metadata, key, source)
    if not tokens:
        raise GGUFError(source, key, "the vocabulary is empty")
    first_index: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if not isinstance(token, str):
            raise GGUFError(source, key, f"token {index} is a {type(token).__name__}, not a string")
        # Empty tokens occur in a few converted vocabularies; they can never be matched, so several may coexist.
        if token and first_index.setdefault(token, index) != index:
            raise GGUFError(source, key, f"token {index} {token!r} repeats token {first_index[token]}")
    return tuple(tokens)


def _token_types(metadata: dict, n_tokens: int, source: str) -> tuple[TokenType, ...]:
    key = _KEY + "token_type"
    values = _array(metadata, key, source)
    if len(values) != n_tokens:
        raise GGUFError(source, key, f"has {len(values)} entries but the vocabulary has {n_tokens} tokens")
    valid = {int(t) for t in TokenType}
    types = []
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int) or value not in valid:
            raise GGUFError(source, key, f"entry {index} is {value!r}; token types are integers 0..6")
        types.append(TokenType(value))
    return tuple(types)


def _scores(metadata: dict, n_tokens: int, source: str, *, required: bool) -> tuple[float, ...] | None:
    key = _KEY + "scores"
    if metadata.get(key) is None and not required:
        return None
    values = _array(metadata, key, source)
    if len(values) != n_tokens:
        raise GGUFError(source, key, f"has {len(values)} entries but the vocabulary has {n_tokens} tokens")
    scores = []
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise GGUFError(source, key, f"entry {index} is {value!r}; scores are finite numbers")
        scores.append(float(value))
    return tuple(scores)


def _merges(metadata: dict, known: set[str], source: str) -> tuple[tuple[str, str], ...]:
    key = _KEY + "merges"
    merges = []
    for rank, merge in enumerate(_array(metadata, key, source)):
        if not isinstance(merge, str):
            raise GGUFError(source, key, f"merge {rank} is a {type(merge).__name__}, not a string")
        # The separator is the first space after the first character: a left part may itself be a space.
        cut = merge.find(" ", 1)
        left, right = (merge[:cut], merge[cut + 1:]) if cut > 0 else (merge, "")
        if not left or not right:
            raise GGUFError(source, key, f"merge {rank} {merge!r} is not two tokens separated by a space")
        for part in (left, right, left + right):
            if part not in known:
                raise GGUFError(source, key, f"merge {rank} {merge!r} names {part!r}, which is not in the vocabulary")
        merges.append((left, right))
    return tuple(merges)


def _token_id(metadata: dict, name: str, n_tokens: int, source: str) -> int | None:
    key = f"{_KEY}{name}_token_id"
    value = metadata.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise GGUFError(source, key, f"expected an integer token id, got {value!r}")
    if not 0 <= value < n_tokens:
        raise GGUFError(source, key, f"id {value} is outside the vocabulary (0..{n_tokens - 1})")
    return value


def _flag(metadata: dict, name: str, source: str) -> bool | None:
    key = _KEY + name
    value = metadata.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise GGUFError(source, key, f"expected a boolean, got {value!r}")
