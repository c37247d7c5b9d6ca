"""Synthetic vocabularies: structure, real special-token ids, and acceptance by tokenizer libraries."""

from __future__ import annotations

import dataclasses

import pytest
from gguf import TokenType
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from replayllm.errors import InvalidParameterError
from replayllm.synth import SHAPES, VocabSpec, build_vocab, write_model
from replayllm.synth.vocab import byte_level_char


def _vocab(shape_name):
    shape = SHAPES[shape_name]
    return build_vocab(shape.vocab, shape.vocab_size)


def test_byte_level_alphabet_matches_gpt2():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    reference = bytes_to_unicode()
    assert [byte_level_char(b) for b in range(256)] == [reference[b] for b in range(256)]


def test_llama_sentencepiece_layout():
    vocab = _vocab("llama2-7b")
    assert len(vocab.tokens) == len(vocab.token_types) == len(vocab.scores) == 32000
    assert vocab.tokens[:3] == ("<unk>", "<s>", "</s>")
    assert vocab.token_types[:3] == (TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL)
    assert (vocab.unknown_token_id, vocab.bos_token_id, vocab.eos_token_id) == (0, 1, 2)
    assert vocab.tokens[3 + 0x0A] == "<0x0A>" and vocab.tokens[3 + 0xFF] == "<0xFF>"
    assert set(vocab.token_types[3:259]) == {TokenType.BYTE}
    assert set(vocab.token_types[259:]) == {TokenType.NORMAL}
    assert len(set(vocab.tokens)) == 32000
    pieces = vocab.scores[259:]
    assert all(a > b for a, b in zip(pieces, pieces[1:]))  # earlier pieces merge first
    assert vocab.merges is None


@pytest.mark.parametrize("shape_name,size,specials", [
    ("llama3-8b", 128256, {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|start_header_id|>": 128006,
                           "<|end_header_id|>": 128007, "<|eot_id|>": 128009,
                           "<|reserved_special_token_0|>": 128002, "<|reserved_special_token_250|>": 128255}),
    ("qwen2-7b", 152064, {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}),
])
def test_bpe_layout_of_real_shapes(shape_name, size, specials):
    vocab = _vocab(shape_name)
    assert len(vocab.tokens) == len(vocab.token_types) == size
    assert len(set(vocab.tokens)) == size
    for token, token_id in specials.items():
        assert vocab.tokens[token_id] == token
        assert vocab.token_types[token_id] == TokenType.CONTROL
    first_special = min(specials.values())
    assert set(vocab.token_types[:first_special]) == {TokenType.NORMAL}
    assert vocab.tokens[:256] == tuple(byte_level_char(b) for b in range(256))
    assert len(vocab.merges) == first_special - 256
    _assert_merges_are_valid(vocab)


def test_qwen2_pads_with_unused_tokens():
    vocab = _vocab("qwen2-7b")
    assert vocab.tokens[151646] == "[PAD151646]" and vocab.tokens[-1] == "[PAD152063]"
    assert set(vocab.token_types[151646:]) == {TokenType.UNUSED}
    assert vocab.bos_token_id == vocab.eos_token_id == 151643


def _assert_merges_are_valid(vocab):
    ids = {token: i for i, token in enumerate(vocab.tokens)}
    for merge in vocab.merges:
        left, right = merge.split(" ")
        merged = ids[left + right]
        assert ids[left] < merged and ids[right] < merged, merge


def _bpe_tokenizer(vocab):
    regular = {t: i for i, t in enumerate(vocab.tokens) if vocab.token_types[i] == TokenType.NORMAL}
    merges = [tuple(m.split(" ")) for m in vocab.merges]
    tokenizer = Tokenizer(models.BPE(regular, merges))  # rejects merges whose parts are not in the vocab
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


@pytest.mark.parametrize("shape_name", ["tiny", "llama3-8b"])
def test_tokenizers_library_accepts_the_bpe_vocab(shape_name):
    tokenizer = _bpe_tokenizer(_vocab(shape_name))
    text = "the quick brown fox\n  jumps! ✓ 123"
    encoding = tokenizer.encode(text)
    assert tokenizer.decode(encoding.ids) == text
    assert len(encoding.ids) < len(text.encode())  # merges apply


@pytest.fixture(scope="module")
def transformers_auto_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer


def test_transformers_gguf_loader_accepts_tiny(tmp_path, transformers_auto_tokenizer):
    write_model(SHAPES["tiny"], "q8_0", tmp_path / "tiny.gguf", progress=False, workers=1)
    tokenizer = transformers_auto_tokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert len(tokenizer) == SHAPES["tiny"].vocab_size
    text = "<|im_start|>user\nhello world ✓<|im_end|>"
    ids = tokenizer.encode(text)
    assert ids[0] == 382 and ids[-1] == 383  # control tokens kept whole, at their ids
    assert tokenizer.decode(ids) == text


def test_transformers_gguf_loader_accepts_a_sentencepiece_vocab(tmp_path, transformers_auto_tokenizer):
    shape = dataclasses.replace(SHAPES["tiny"], vocab=VocabSpec(model="llama", pre="default", num_regular_tokens=700),
                                vocab_size=768)
    write_model(shape, "q8_0", tmp_path / "spm.gguf", progress=False, workers=1)
    tokenizer = transformers_auto_tokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    ids = tokenizer.encode("hello world\nZ€")
    assert ids[0] == 1  # <s>: add_bos_token
    assert tokenizer.convert_ids_to_tokens(ids)[-3:] == ["<0xE2>", "<0x82>", "<0xAC>"]  # byte fallback for "€"
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "hello world\nZ€"


def test_bad_specs_are_rejected():
    with pytest.raises(InvalidParameterError, match="tokenizer model"):
        VocabSpec(model="wordpiece", pre="default", num_regular_tokens=300)
    with pytest.raises(InvalidParameterError, match="at least 259"):
        VocabSpec(model="llama", pre="default", num_regular_tokens=100)
    with pytest.raises(InvalidParameterError, match="eos_token"):
        VocabSpec(model="gpt2", pre="qwen2", num_regular_tokens=300, control_tokens=("<a>",), bos_token="<a>",
                  eos_token="<b>")
    with pytest.raises(InvalidParameterError, match="smaller"):
        build_vocab(SHAPES["tiny"].vocab, 100)


@pytest.mark.parametrize("shape_name,expected", [
    ("tiny", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
    ("qwen2-7b", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
    ("llama3-8b", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n"),
])
def test_chat_templates_render(shape_name, expected):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = ImmutableSandboxedEnvironment().from_string(SHAPES[shape_name].vocab.chat_template)
    rendered = template.render(messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True,
                               bos_token="<|begin_of_text|>")
    assert rendered == expected
