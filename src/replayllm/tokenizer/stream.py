"""Turning generated token ids into text one token at a time, never splitting a UTF-8 character.

A byte-level or byte-fallback vocabulary can spell one character over several tokens (an emoji is often
four byte tokens). The decoder keeps the bytes of an unfinished character until the token that completes
it arrives, so every returned string is whole and the concatenation of all of them (plus `flush`) equals
`Tokenizer.decode` of the same ids.
"""

from __future__ import annotations

import codecs

from .pieces import PieceTable


class StreamDecoder:
    """Incremental detokenizer for one sequence. Not thread-safe; create one per sequence.

    `at_text_start`: the ids begin a text (rather than continue a prompt), so the first piece loses the
    space prefix a SentencePiece vocabulary adds, exactly as `Tokenizer.decode` does.
    """

    def __init__(self, pieces: PieceTable, skip_special_tokens: bool = True, at_text_start: bool = False):
        self._pieces = pieces
        self._skip_special_tokens = skip_special_tokens
        self._at_text_start = at_text_start
        self._awaiting_first_piece = at_text_start
        # The incremental decoder holds back an incomplete trailing sequence and replaces invalid bytes
        # with U+FFFD exactly where a one-shot decode of all the bytes would.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text completed by this token: "" while a character is still incomplete or for a skipped token."""
        piece = self._pieces.shown_bytes(token_id, self._skip_special_tokens)
        if piece is None:
            return ""
        if self._awaiting_first_piece:
            piece = self._pieces.strip_space_prefix(piece)
            self._awaiting_first_piece = False
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """The rest of the text (incomplete trailing bytes become U+FFFD); the decoder then starts afresh."""
        tail = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        self._awaiting_first_piece = self._at_text_start
        return tail
