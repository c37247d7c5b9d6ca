"""StreamDecoder: whole characters only, and the same text as a one-shot decode of the same ids."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vocab_files import BYTE_CHARS, byte_level_metadata, byte_level_tokens

from replayllm.errors import InvalidParameterError
from replayllm.tokenizer import Tokenizer

TOKENS, _ = byte_level_tokens()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_metadata(byte_level_metadata("qwen2"), "synthetic.gguf")


@pytest.fixture(scope="module")
def spm_tokenizer() -> Tokenizer:
    """A hand-made SentencePiece vocabulary: controls, 256 byte tokens, a few words."""
    words = ["▁", "a", "b", "▁a", "▁ab", "é"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *words]
    types = [2, 3, 3, *[6] * 256, *[1] * len(words)]
    metadata = {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(words))],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
    }
    return Tokenizer.from_metadata(metadata, "synthetic-spm.gguf")


def byte_ids(data: bytes) -> list[int]:
    """The single-byte tokens spelling `data`."""
    return [TOKENS.index(BYTE_CHARS[b]) for b in data]


def test_a_character_split_over_byte_tokens_comes_out_whole(tokenizer):
    ids = byte_ids("😀".encode())
    assert len(ids) == 4
    decoder = tokenizer.stream_decoder()
    assert [decoder.push(i) for i in ids] == ["", "", "", "😀"]
    assert decoder.flush() == ""


def test_pieces_never_hold_half_a_character(tokenizer):
    text = "héllo 日本 👨‍👩‍👧 ٣ done"
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(i) for i in tokenizer.encode(text)]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + decoder.flush() == text
    assert sum(1 for p in pieces if p == "") >= 10  # the multi-byte characters were held back


def test_an_unfinished_character_is_flushed_as_replacement(tokenizer):
    decoder = tokenizer.stream_decoder()
    assert decoder.push(TOKENS.index("x")) == "x"
    for i in byte_ids("😀".encode())[:3]:
        assert decoder.push(i) == ""
    assert decoder.flush() == "\ufffd"
    # Flushing ends the stream: the next push starts a new one.
    assert decoder.push(TOKENS.index("x")) == "x"


def test_special_tokens_are_skipped_unless_asked(tokenizer):
    ids = tokenizer.encode("<|im_start|>a<tool>b<|im_end|>")
    skipping = tokenizer.stream_decoder()
    assert "".join(skipping.push(i) for i in ids) == "a<tool>b"
    keeping = tokenizer.stream_decoder(skip_special_tokens=False)
    assert "".join(keeping.push(i) for i in ids) == "<|im_start|>a<tool>b<|im_end|>"


def test_push_rejects_ids_outside_the_vocabulary(tokenizer):
    decoder = tokenizer.stream_decoder()
    with pytest.raises(InvalidParameterError, match="outside the vocabulary"):
        decoder.push(len(TOKENS))
    with pytest.raises(InvalidParameterError):
        decoder.push(-1)


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, len(TOKENS) - 1), max_size=30), skip=st.booleans())
def test_pushes_plus_flush_equal_decode_for_any_ids(tokenizer, ids, skip):
    # Random ids include stray continuation bytes and cut-off sequences: U+FFFD must land where decode puts it.
    decoder = tokenizer.stream_decoder(skip_special_tokens=skip)
    streamed = "".join(decoder.push(i) for i in ids) + decoder.flush()
    assert streamed == tokenizer.decode(ids, skip_special_tokens=skip)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=30))
def test_streaming_any_text_gives_it_back(tokenizer, text):
    decoder = tokenizer.stream_decoder(skip_special_tokens=False)  # the text may spell "<|im_end|>"
    pieces = [decoder.push(i) for i in tokenizer.encode(text)]
    assert "".join(pieces) + decoder.flush() == text


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 258 + 6), max_size=20))
def test_spm_stream_at_text_start_equals_decode(spm_tokenizer, ids):
    decoder = spm_tokenizer.stream_decoder(at_text_start=True)
    streamed = "".join(decoder.push(i) for i in ids) + decoder.flush()
    assert streamed == spm_tokenizer.decode(ids, skip_special_tokens=True)


def test_spm_stream_keeps_the_first_space_of_generated_text(spm_tokenizer):
    ids = spm_tokenizer.encode("ab é", add_bos=False)
    assert spm_tokenizer.decode(ids) == "ab é"
    continuing = spm_tokenizer.stream_decoder()
    assert "".join(continuing.push(i) for i in ids) + continuing.flush() == " ab é"
