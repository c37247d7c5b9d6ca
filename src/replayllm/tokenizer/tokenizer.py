"""`Tokenizer`: text <-> token ids for the vocabulary stored in a GGUF file, plus its chat template.

Encoding runs on the `tokenizers` library (a BPE model built from the file's vocabulary and merges, behind
the pre-tokenizer or normalizer the vocabulary was trained with). Decoding reads a byte table built from the
same vocabulary (`pieces.py`), which lets the streaming decoder cut text at UTF-8 boundaries.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer as Backend

from ..errors import GGUFError, InvalidParameterError
from .byte_level import build_byte_level
from .chat import render_chat
from .pieces import PieceTable
from .pretokenizers import resolve_pre_tokenizer
from .spm import build_spm
from .stream import StreamDecoder
from .vocab import Vocab, vocab_from_metadata

# Tokens that end a turn in common chat formats; generation stops on them as on EOS (llama.cpp's list).
END_OF_TURN_TEXTS = frozenset({
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end|>", "<|end_of_text|>",
    "<end_of_turn>", "<end_of_utterance>", "<EOT>", "<｜end▁of▁sentence｜>",
})


class Tokenizer:
    """Encoder/decoder for one GGUF vocabulary. Build it with `Tokenizer.from_metadata`."""

    def __init__(self, vocab: Vocab, backend: Backend, pieces: PieceTable, add_bos: bool):
        self._vocab = vocab
        self._backend = backend
        self._pieces = pieces
        self.add_bos = add_bos
        self.vocab_size = len(vocab)
        self.bos_id = vocab.bos_id
        self.eos_id = vocab.eos_id
        self.chat_template = vocab.chat_template
        self.stop_ids = _stop_ids(vocab)

    @classmethod
    def from_metadata(cls, metadata: dict, source: str) -> Tokenizer:
        """Build from a GGUF metadata dict (`tokenizer.ggml.*` keys); `source` names the file in errors."""
        vocab = vocab_from_metadata(metadata, source)
        if vocab.model == "gpt2":
            spec = resolve_pre_tokenizer(vocab.pre, source)
            backend, pieces = build_byte_level(vocab, spec, source)
            add_bos_default = spec.add_bos_default
        else:
            # SentencePiece vocabularies add the space prefix unless the file says otherwise.
            add_space_prefix = True if vocab.add_space_prefix is None else vocab.add_space_prefix
            backend, pieces = build_spm(vocab, add_space_prefix, source)
            add_bos_default = True
        return cls(vocab, backend, pieces, _resolve_add_bos(vocab, add_bos_default, source))

    # ---- encoding -----------------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`. Control and user-defined tokens written in the text ("<|im_start|>") become
        their ids. `add_bos` None follows the model file's add_bos_token; EOS is appended when the file's
        add_eos_token asks for it."""
        if not isinstance(text, str):
            raise InvalidParameterError(f"text to encode must be a str, got {type(text).__name__}")
        _check_encodable(text)
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise InvalidParameterError("add_bos=True, but this model's vocabulary has no BOS token")
            ids.insert(0, self.bos_id)
        if self._vocab.add_eos_token and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    # ---- decoding -----------------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`, taken as a whole text: a SentencePiece space prefix at its start is removed.
        Invalid UTF-8 (a character cut off at the end, say) comes out as U+FFFD."""
        data = self._pieces.join(ids, skip_special_tokens, at_text_start=True)
        return data.decode("utf-8", errors="replace")

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of `token_id` as the file stores it ("Ġthe", "▁the", "<0x0A>", "<|im_end|>")."""
        return self._vocab.tokens[self._pieces.check_id(token_id)]

    def stream_decoder(self, skip_special_tokens: bool = True, *, at_text_start: bool = False) -> StreamDecoder:
        """A decoder for ids that arrive one at a time. By default the ids continue a prompt (a generated
        " Paris" keeps its space); `at_text_start=True` decodes them as `decode` does."""
        return StreamDecoder(self._pieces, skip_special_tokens, at_text_start)

    # ---- chat ---------------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` under the model's chat template (ChatML when it has none)."""
        return render_chat(self.chat_template, messages, add_generation_prompt,
                           bos_token=self._special_text(self.bos_id), eos_token=self._special_text(self.eos_id))

    def _special_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self._vocab.tokens[token_id]


def _resolve_add_bos(vocab: Vocab, default: bool, source: str) -> bool:
    if vocab.add_bos_token is None:
        return default and vocab.bos_id is not None
    if vocab.add_bos_token and vocab.bos_id is None:
        raise GGUFError(source, "tokenizer.ggml.add_bos_token", "is true but the file names no bos_token_id")
    return vocab.add_bos_token


def _stop_ids(vocab: Vocab) -> frozenset[int]:
    ids = {i for i in (vocab.eos_id, vocab.eot_id, vocab.eom_id) if i is not None}
    ids.update(i for i, token in enumerate(vocab.tokens) if token in END_OF_TURN_TEXTS)
    return frozenset(ids)


def _check_encodable(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidParameterError(
            f"text has an unpaired surrogate {text[err.start]!r} at index {err.start}, which UTF-8 cannot "
            f"encode; fix the string's decoding") from err
