"""SentencePiece-style vocabularies (`tokenizer.ggml.model == "llama"`) against the sentencepiece library.

Small BPE models are trained here with sentencepiece itself, written into GGUF files as llama.cpp's converter
would (pieces, scores, types), read back, and tokenized by both. Where llama.cpp's rules for GGUF differ from
sentencepiece (a space prefix after every special or user-defined token), the expectation is worked out by hand.
"""

from __future__ import annotations

import io

import pytest
from vocab_files import read_metadata, write_metadata

from replayllm.tokenizer import Tokenizer

spm = pytest.importorskip("sentencepiece")
from sentencepiece import sentencepiece_model_pb2  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello there! She sells sea shells by the sea shore.",
    "It's 12345 and 678. Tokens, tokenizer, tokenization.",
    "naïve café déjà vu",
    "  indented   text here\nline one\nline two",
] * 20

TEXTS = [
    *CORPUS[:5],  # text the merges were learned from: long tokens, so merge order matters
    "Hello world",
    "the sea shells",
    "  two  spaces  ",
    "naïve café, 日本 😀",  # characters outside the vocabulary fall back to byte tokens
    "12345 678",
    "line\n\nbreak\ttab",
    "The lazy fox!",
    "",
    " ",
]


def train(**options) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, model_type="bpe", vocab_size=420,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        hard_vocab_limit=False, user_defined_symbols=["<tool>"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, **options)
    return model.getvalue()


def gguf_metadata(model: bytes, **extra) -> dict:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    metadata = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [p.piece for p in proto.pieces],
        "tokenizer.ggml.scores": [p.score for p in proto.pieces],
        "tokenizer.ggml.token_type": [int(p.type) for p in proto.pieces],  # same numbering as GGUF's
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_space_prefix": proto.normalizer_spec.add_dummy_prefix,
    }
    metadata.update(extra)
    return metadata


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (sentencepiece processor, our tokenizer read from a GGUF file)."""
    folder = tmp_path_factory.mktemp("spm")
    built = {}
    for name, options in {
        "prefix": dict(byte_fallback=True, add_dummy_prefix=True),
        "no_prefix": dict(byte_fallback=True, add_dummy_prefix=False),
        "no_bytes": dict(byte_fallback=False, add_dummy_prefix=True),
    }.items():
        model = train(**options)
        path = write_metadata(folder / f"{name}.gguf", gguf_metadata(model))
        built[name] = (spm.SentencePieceProcessor(model_proto=model),
                       Tokenizer.from_metadata(read_metadata(path), str(path)))
    return built


@pytest.mark.parametrize("name", ["prefix", "no_prefix"])
@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_sentencepiece(models, name, text):
    processor, tokenizer = models[name]
    assert tokenizer.encode(text, add_bos=False) == processor.encode(text)


@pytest.mark.parametrize("name", ["prefix", "no_prefix"])
@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_sentencepiece_and_round_trips(models, name, text):
    processor, tokenizer = models[name]
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=True) == processor.decode(ids[1:]) == text


def test_bos_is_added_by_default(models):
    processor, tokenizer = models["prefix"]
    assert tokenizer.add_bos and tokenizer.bos_id == 1
    assert tokenizer.encode("Hello") == [1, *processor.encode("Hello")]


def test_space_prefix_shows_in_pieces(models):
    _, with_prefix = models["prefix"]
    _, without = models["no_prefix"]
    assert with_prefix.id_to_piece(with_prefix.encode("the", add_bos=False)[0]).startswith("▁")
    assert not without.id_to_piece(without.encode("the", add_bos=False)[0]).startswith("▁")


def test_text_after_a_special_token_gets_the_space_prefix(models):
    # llama.cpp's rule for GGUF: each stretch of text after a control or user-defined token is tokenized as
    # a new text, space prefix included (sentencepiece itself would continue "b" without one).
    processor, tokenizer = models["prefix"]
    tool = processor.piece_to_id("<tool>")
    assert tokenizer.encode("a<tool>b", add_bos=False) == [*processor.encode("a"), tool, *processor.encode("b")]
    assert tokenizer.encode("<s>Hello</s>", add_bos=False) == [1, *processor.encode("Hello"), 2]


def test_unknown_characters_without_byte_tokens(models):
    processor, tokenizer = models["no_bytes"]
    text = "a 😀😀 b"
    ids = tokenizer.encode(text, add_bos=False)
    assert ids == processor.encode(text)
    assert 0 in ids  # fused into one <unk>, as sentencepiece does
    assert ids.count(0) == 1


def test_decode_drops_the_prefix_only_at_the_start(models):
    processor, tokenizer = models["prefix"]
    hello = processor.encode("Hello")
    assert tokenizer.decode(hello) == "Hello"
    assert tokenizer.decode([1, *hello]) == "<s> Hello"  # BOS is the first piece: nothing to strip
    assert tokenizer.decode([1, *hello], skip_special_tokens=True) == "Hello"
    assert tokenizer.decode(hello + hello) == "Hello Hello"
    decoder = tokenizer.stream_decoder()  # generated text continues a prompt: its first space stays
    assert "".join(decoder.push(i) for i in hello) + decoder.flush() == " Hello"


def test_byte_tokens_decode_to_bytes(models):
    processor, tokenizer = models["prefix"]
    ids = [processor.piece_to_id(f"<0x{b:02X}>") for b in "😀".encode()]
    assert tokenizer.decode(ids) == "😀"
    assert tokenizer.decode(ids[:2]) == "\ufffd"  # an incomplete character is replaced, not dropped silently
