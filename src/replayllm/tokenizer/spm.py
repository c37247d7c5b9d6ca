"""SentencePiece-style BPE (`tokenizer.ggml.model == "llama"`): Llama 1/2, Mistral v1, TinyLlama vocabularies.

Spaces are written "▁"; with `add_space_prefix` one is put in front of the text (and after every special
token, as llama.cpp does). Merging repeatedly joins the adjacent pair whose union is the vocabulary token
with the highest score. That is BPE with merges ranked by the score of their result, so the ranked merge
list is derived from the scores and handed to the `tokenizers` BPE model. Characters the vocabulary lacks
fall back to byte tokens "<0xE2>"..., and to the unknown token when those are missing too.
"""

from __future__ import annotations

import re

from tokenizers import AddedToken, normalizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from ..errors import GGUFError
from .pieces import PieceTable
from .vocab import TokenType, Vocab

SPACE = "\u2581"  # "▁", SentencePiece's visible space
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_MERGEABLE_TYPES = frozenset({TokenType.NORMAL, TokenType.UNDEFINED})
_SPECIAL_TYPES = frozenset({TokenType.CONTROL, TokenType.UNKNOWN, TokenType.UNUSED})
_MATCHED_SPECIAL_TYPES = frozenset({TokenType.CONTROL, TokenType.UNKNOWN})


def build_spm(vocab: Vocab, add_space_prefix: bool, source: str) -> tuple[Backend, PieceTable]:
    """The `tokenizers` backend that encodes text to ids, and the table that decodes ids to bytes."""
    keys = {(token or f"\u2400empty-token-{index}"): index for index, token in enumerate(vocab.tokens)}
    unknown = vocab.tokens[vocab.unknown_id] if vocab.unknown_id is not None else None
    model = BPE(vocab=keys, merges=spm_merges(vocab), unk_token=unknown, byte_fallback=True, fuse_unk=True)
    backend = Backend(model)
    steps = [normalizers.Prepend(SPACE)] if add_space_prefix else []
    steps.append(normalizers.Replace(" ", SPACE))
    backend.normalizer = normalizers.Sequence(steps)
    _add_literal_tokens(backend, vocab)
    if backend.get_vocab_size(with_added_tokens=True) != len(vocab):
        raise GGUFError(source, "tokenizer.ggml.tokens", "special tokens do not map onto vocabulary entries")
    return backend, _piece_table(vocab, add_space_prefix, source)


def spm_merges(vocab: Vocab) -> list[tuple[str, str]]:
    """Every way to build a normal token from two normal tokens, best-scoring result first.

    Ties between results of equal score are broken by token id; SentencePiece breaks them by position in
    the text instead, which only matters for vocabularies with repeated scores.
    """
    assert vocab.scores is not None  # vocab_from_metadata requires scores for this model
    ids = {t: i for i, (t, tt) in enumerate(zip(vocab.tokens, vocab.token_types)) if t and tt in _MERGEABLE_TYPES}
    ranked = []
    for merged, merged_id in ids.items():
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in ids and right in ids:
                ranked.append((-vocab.scores[merged_id], merged_id, ids[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_literal_tokens(backend: Backend, vocab: Vocab) -> None:
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


def _piece_table(vocab: Vocab, add_space_prefix: bool, source: str) -> PieceTable:
    pieces, special = [], []
    for index, (token, token_type) in enumerate(zip(vocab.tokens, vocab.token_types)):
        if token_type == TokenType.BYTE:
            match = _BYTE_TOKEN.fullmatch(token)
            if match is None:
                raise GGUFError(source, "tokenizer.ggml.tokens",
                                f"token {index} {token!r} is typed BYTE but is not written <0xXX>")
            pieces.append(bytes((int(match.group(1), 16),)))
        elif token_type in _SPECIAL_TYPES:
            pieces.append(token.encode("utf-8"))
        else:
            pieces.append(token.replace(SPACE, " ").encode("utf-8"))
        special.append(token_type in _SPECIAL_TYPES)
    return PieceTable(tuple(pieces), tuple(special), strips_leading_space=add_space_prefix)
