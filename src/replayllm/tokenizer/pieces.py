"""The bytes each token id stands for: the one table both `decode` and the streaming decoder read.

Decoding is done here rather than by the `tokenizers` library so that a token is always a fixed byte string:
text is then the UTF-8 decoding of the concatenated bytes, and a stream can hold back an incomplete
character without re-decoding everything before it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import InvalidParameterError


@dataclass(frozen=True)
class PieceTable:
    """`piece_bytes[i]`: what token i spells. `is_special[i]`: a control-like token (BOS, <|im_end|>, ...),
    left out when special tokens are skipped. `strips_leading_space`: the encoder added one space in front
    of the text (SentencePiece's space prefix), so decoding the start of a text removes it again."""

    piece_bytes: tuple[bytes, ...]
    is_special: tuple[bool, ...]
    strips_leading_space: bool = False

    def __post_init__(self):
        if len(self.piece_bytes) != len(self.is_special):
            raise ValueError("piece_bytes and is_special must have one entry per token")

    def __len__(self) -> int:
        return len(self.piece_bytes)

    def check_id(self, token_id) -> int:
        """`token_id` as an int, or InvalidParameterError naming the valid range."""
        if isinstance(token_id, bool) or not hasattr(token_id, "__index__"):
            raise InvalidParameterError(f"token ids must be integers, got {token_id!r}")
        index = token_id.__index__()
        if not 0 <= index < len(self.piece_bytes):
            raise InvalidParameterError(
                f"token id {index} is outside the vocabulary (0..{len(self.piece_bytes) - 1})")
        return index

    def shown_bytes(self, token_id, skip_special_tokens: bool) -> bytes | None:
        """The bytes token `token_id` adds to the text, or None when it is skipped."""
        index = self.check_id(token_id)
        if skip_special_tokens and self.is_special[index]:
            return None
        return self.piece_bytes[index]

    def join(self, ids: Iterable, skip_special_tokens: bool, at_text_start: bool) -> bytes:
        """The bytes of `ids` in order; at the start of a text the first shown piece loses the space prefix."""
        parts = []
        for token_id in ids:
            piece = self.shown_bytes(token_id, skip_special_tokens)
            if piece is None:
                continue
            if at_text_start and not parts:
                piece = self.strip_space_prefix(piece)
            parts.append(piece)
        return b"".join(parts)

    def strip_space_prefix(self, piece: bytes) -> bytes:
        if self.strips_leading_space and piece.startswith(b" "):
            return piece[1:]
        return piece
