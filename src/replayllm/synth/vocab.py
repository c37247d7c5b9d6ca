"""Valid synthetic vocabularies for the two tokenizer families GGUF llama-family models use.

The pieces are made up, but the structure is the real one, so llama.cpp, the `tokenizers`
library and transformers' GGUF loader accept them:

- `llama` (SentencePiece): `<unk>`, `<s>`, `</s>` (control), the 256 byte tokens `<0x00>`..`<0xFF>`
  (type BYTE, needed for byte fallback), then unique pieces ("▁", letters, "▁" + letters, ...)
  with scores that fall with the id, as in real SentencePiece vocabularies.
- `gpt2` (byte-level BPE): the 256 byte-level characters, then merged tokens, each the result of
  a listed merge "a b" of two earlier tokens, then the control tokens, then `[PAD<id>]` tokens
  (type UNUSED) up to the embedding size, as llama.cpp's converter pads.
"""

from __future__ import annotations

import itertools
import string
from dataclasses import dataclass
from functools import lru_cache

from gguf import TokenType

from ..errors import InvalidParameterError

SPM_WORD_BOUNDARY = "\u2581"  # "▁": SentencePiece's visible space
BPE_WORD_BOUNDARY = "\u0120"  # "Ġ": the byte-level spelling of a space
_SPM_FIXED = ("<unk>", "<s>", "</s>")


@dataclass(frozen=True)
class VocabSpec:
    """What a shape's tokenizer looks like; `build_vocab` turns it into GGUF arrays.

    `num_regular_tokens` counts every token before the control tokens (for `llama` it includes
    `<unk>`, `<s>`, `</s>` and the byte tokens); the control tokens follow; padding fills up to
    the model's vocab size.
    """

    model: str  # tokenizer.ggml.model: "llama" or "gpt2"
    pre: str  # tokenizer.ggml.pre
    num_regular_tokens: int
    control_tokens: tuple[str, ...] = ()
    bos_token: str = "<s>"
    eos_token: str = "</s>"
    add_bos_token: bool = True
    chat_template: str | None = None

    def __post_init__(self):
        if self.model not in ("llama", "gpt2"):
            raise InvalidParameterError(f"tokenizer model {self.model!r} is not supported; use 'llama' or 'gpt2'")
        minimum = 256 + (len(_SPM_FIXED) if self.model == "llama" else 0)
        if self.num_regular_tokens < minimum:
            raise InvalidParameterError(f"num_regular_tokens={self.num_regular_tokens}: a {self.model} vocab "
                                        f"needs at least {minimum} (the byte tokens)")
        if len(set(self.control_tokens)) != len(self.control_tokens):
            raise InvalidParameterError("control_tokens must be unique")
        named = set(self.control_tokens) | (set(_SPM_FIXED) if self.model == "llama" else set())
        for role, token in (("bos_token", self.bos_token), ("eos_token", self.eos_token)):
            if token not in named:
                raise InvalidParameterError(f"{role}={token!r} is not one of the control tokens {sorted(named)}")

    @property
    def min_vocab_size(self) -> int:
        return self.num_regular_tokens + len(self.control_tokens)


@dataclass(frozen=True)
class Vocab:
    """The tokenizer.ggml.* arrays, all of length `vocab_size` (merges and scores aside)."""

    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    scores: tuple[float, ...] | None  # llama only
    merges: tuple[str, ...] | None  # gpt2 only, best (first applied) first
    bos_token_id: int
    eos_token_id: int
    unknown_token_id: int | None


def build_vocab(spec: VocabSpec, vocab_size: int) -> Vocab:
    """The full vocabulary for `spec`, padded to exactly `vocab_size` tokens."""
    if vocab_size < spec.min_vocab_size:
        raise InvalidParameterError(f"vocab_size={vocab_size} is smaller than the {spec.min_vocab_size} tokens "
                                    f"the {spec.model} vocab needs")
    if spec.model == "llama":
        tokens, types, scores = _spm_regular_tokens(spec.num_regular_tokens)
        merges = None
    else:
        tokens, types, merges = _bpe_regular_tokens(spec.num_regular_tokens)
        scores = None
    tokens += list(spec.control_tokens)
    types += [TokenType.CONTROL] * len(spec.control_tokens)
    padding = [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    tokens += padding
    types += [TokenType.UNUSED] * len(padding)
    if scores is not None:
        scores += [0.0] * (vocab_size - len(scores))
    index = {token: i for i, token in enumerate(tokens)}
    if len(index) != len(tokens):
        raise InvalidParameterError("control token names collide with generated pieces; rename them")
    return Vocab(
        tokens=tuple(tokens),
        token_types=tuple(int(t) for t in types),
        scores=None if scores is None else tuple(scores),
        merges=None if merges is None else tuple(merges),
        bos_token_id=index[spec.bos_token],
        eos_token_id=index[spec.eos_token],
        unknown_token_id=index["<unk>"] if spec.model == "llama" else None,
    )


def _spm_regular_tokens(count: int) -> tuple[list[str], list[int], list[float]]:
    tokens = list(_SPM_FIXED) + [f"<0x{b:02X}>" for b in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    scores = [0.0] * len(tokens)
    # Pieces in order of length: "▁", then "a".."z", "▁a".."▁z", then two letters, ...
    pieces = itertools.chain([SPM_WORD_BOUNDARY], _words(with_prefix=SPM_WORD_BOUNDARY))
    first_piece = len(tokens)
    for i, piece in zip(range(count - first_piece), pieces):
        tokens.append(piece)
        types.append(TokenType.NORMAL)
        scores.append(-float(i))  # SentencePiece merges higher scores first
    return tokens, types, scores


def _bpe_regular_tokens(count: int) -> tuple[list[str], list[int], list[str]]:
    tokens = [byte_level_char(b) for b in range(256)]
    types = [TokenType.NORMAL] * 256
    merges = []
    # Each word w of two or more symbols is the merge of w[:-1] (made earlier: shorter) and w[-1].
    words = (w for w in _words(with_prefix=BPE_WORD_BOUNDARY) if len(w) >= 2)
    for word in itertools.islice(words, count - 256):
        tokens.append(word)
        types.append(TokenType.NORMAL)
        merges.append(f"{word[:-1]} {word[-1]}")
    return tokens, types, merges


def _words(with_prefix: str):
    """Lower-case words by length, each length first bare then with the word-boundary prefix:
    "a".."z", "Pa".."Pz", "aa".."zz", "Paa".."Pzz", ... (P the prefix). Infinite, all unique."""
    for length in itertools.count(1):
        letters = ["".join(p) for p in itertools.product(string.ascii_lowercase, repeat=length)]
        yield from letters
        yield from (with_prefix + w for w in letters)


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> tuple[str, ...]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves, the
    rest (controls, space, ...) to consecutive code points from U+0100, in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, extra = [], 0
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(0x100 + extra))
            extra += 1
    return tuple(table)


def byte_level_char(byte: int) -> str:
    """The byte-level BPE spelling of one byte (space -> "Ġ", newline -> "Ċ")."""
    return _byte_level_alphabet()[byte]
