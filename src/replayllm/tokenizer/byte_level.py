"""Byte-level BPE (`tokenizer.ggml.model == "gpt2"`): GPT-2, Llama 3, Qwen2, SmolLM vocabularies.

Such a vocabulary spells every byte as one printable character (GPT-2's byte alphabet: printable Latin-1
bytes stand for themselves, the other 68 bytes for U+0100 onwards), so tokens are strings like "Ġthe"
(" the"). Control and user-defined tokens ("<|im_start|>") are stored as their literal text instead.
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from ..errors import GGUFError
from .pieces import PieceTable
from .pretokenizers import PreTokenizerSpec
from .vocab import TokenType, Vocab

# Left out of decoded text when special tokens are skipped.
_SPECIAL_TYPES = frozenset({TokenType.CONTROL, TokenType.UNKNOWN, TokenType.UNUSED})
# Recognised where they are written in the text (llama.cpp's rule; unused tokens are not).
_MATCHED_SPECIAL_TYPES = frozenset({TokenType.CONTROL, TokenType.UNKNOWN})
# Stored and decoded as literal text, never byte-mapped.
_LITERAL_TYPES = _SPECIAL_TYPES | {TokenType.USER_DEFINED}


@lru_cache(maxsize=1)
def byte_alphabet() -> tuple[str, ...]:
    """`byte_alphabet()[b]` is the character that spells byte b in a byte-level vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {b: chr(b) for b in printable}
    # The remaining bytes (controls, space, DEL, NBSP, soft hyphen) take code points 256, 257, ... in byte order.
    others = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + n) for n, b in enumerate(others)})
    return tuple(chars[b] for b in range(256))


@lru_cache(maxsize=1)
def _char_to_byte() -> dict[str, int]:
    return {c: b for b, c in enumerate(byte_alphabet())}


def spell_bytes(data: bytes) -> str:
    """The byte-level spelling of raw bytes: spell_bytes(b" the") == "Ġthe"."""
    alphabet = byte_alphabet()
    return "".join(alphabet[b] for b in data)


def unspell(token: str) -> bytes:
    """The bytes a byte-level token stands for; a character outside the alphabet stands for its own UTF-8."""
    table = _char_to_byte()
    out = bytearray()
    for char in token:
        byte = table.get(char)
        out += char.encode("utf-8") if byte is None else bytes((byte,))
    return bytes(out)


def _bpe_key(token: str, token_type: TokenType, index: int) -> str:
    """The string the `tokenizers` BPE model knows token `index` by."""
    if not token:
        # Unreachable by any merge or text; a key with a character no byte maps to keeps it out of the way.
        return f"\u2400empty-token-{index}"
    if token_type in _LITERAL_TYPES:
        return token
    table = _char_to_byte()
    if all(char in table for char in token):
        return token
    # A normal token written in plain UTF-8 (some converters do this): respell it the way the
    # pre-tokenizer will present its bytes, or it could never match.
    return spell_bytes(token.encode("utf-8"))


def build_byte_level(vocab: Vocab, spec: PreTokenizerSpec, source: str) -> tuple[Backend, PieceTable]:
    """The `tokenizers` backend that encodes text to ids, and the table that decodes ids to bytes."""
    keys = [_bpe_key(t, tt, i) for i, (t, tt) in enumerate(zip(vocab.tokens, vocab.token_types))]
    key_to_id: dict[str, int] = {}
    for index, key in enumerate(keys):
        if key_to_id.setdefault(key, index) != index:
            raise GGUFError(source, "tokenizer.ggml.tokens",
                            f"token {index} {vocab.tokens[index]!r} spells the same bytes as token {key_to_id[key]}")
    respelled = {t: k for t, k in zip(vocab.tokens, keys) if t != k and t}
    merges = [(respelled.get(a, a), respelled.get(b, b)) for a, b in vocab.merges]
    backend = Backend(BPE(vocab=key_to_id, merges=merges, ignore_merges=spec.ignore_merges))
    backend.pre_tokenizer = spec.build()
    _add_literal_tokens(backend, vocab)
    if backend.get_vocab_size(with_added_tokens=True) != len(vocab):
        raise GGUFError(source, "tokenizer.ggml.tokens", "special tokens do not map onto vocabulary entries")
    return backend, _piece_table(vocab)


def _add_literal_tokens(backend: Backend, vocab: Vocab) -> None:
    """Control tokens match anywhere in the text (special); user-defined ones too, as ordinary text."""
    specials, user_defined = [], []
    for token, token_type in zip(vocab.tokens, vocab.token_types):
        if not token:
            continue
        if token_type in _MATCHED_SPECIAL_TYPES:
            specials.append(AddedToken(token, special=True, normalized=False))
        elif token_type == TokenType.USER_DEFINED:
            user_defined.append(AddedToken(token, special=False, normalized=False))
    backend.add_special_tokens(specials)
    backend.add_tokens(user_defined)


def _piece_table(vocab: Vocab) -> PieceTable:
    pieces, special = [], []
    for token, token_type in zip(vocab.tokens, vocab.token_types):
        literal = token_type in _LITERAL_TYPES
        pieces.append(token.encode("utf-8") if literal else unspell(token))
        special.append(token_type in _SPECIAL_TYPES)
    return PieceTable(tuple(pieces), tuple(special))
