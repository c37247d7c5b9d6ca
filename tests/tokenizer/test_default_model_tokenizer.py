"""The tokenizer of the real default model (SmolLM2-135M-Instruct: gpt2 BPE, pre-tokenizer `smollm`)
against independent oracles.

Oracle 1: transformers' own GGUF tokenizer loader. It does not know the `smollm` pre-tokenizer and falls
back to plain GPT-2 splitting, which is wrong for this model: SmolLM2's tokenizer.json runs
`Digits(individual_digits=True)` before `ByteLevel`, and llama.cpp's `smollm` regexes isolate every digit
(`\\p{N}`) before GPT-2's pattern. The two disagree only where whitespace runs into a digit or a number
that is not 0-9: GPT-2's ` ?\\p{N}+` takes the space before "333" into the number's piece, so "  333"
becomes "Ġ", "Ġ", "3", "3", "3" instead of "ĠĠ", "3", "3", "3". Oracle 2 is therefore transformers'
tokenizer with SmolLM2's real pre-tokenizer put back; ours must match it on every string, and oracle 1
on every string without that pattern.
"""

from __future__ import annotations

import re

import pytest
from vocab_files import read_metadata

from replayllm.tokenizer import Tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Café déjà vu, naïve façade; Ångström.",
    "你好，世界！这是一个测试。",
    "مرحبا بالعالم",
    "Привет, мир!",
    "Emoji 😀👍🏽🇺🇸 and a family 👨‍👩‍👧‍👦 ❤️",
    "def foo(x):\n    return x ** 2\n\n\tif x:\n\t\tpass\n",
    "a  b   c    d",
    "   leading and trailing   ",
    "tabs\tand\nnewlines\r\n",
    "\n\n\n",
    "x\n\n  y",
    "3.14159 and 1,000,000 and 12345678901234567890",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "a<|im_end|>b<|endoftext|><|endoftext|>",
    "\u00a0no-break\u2003em space",
    "ligature ﬁ, sharp ß ẞ",
    # Whitespace directly before numbers: where the first oracle goes wrong (see the module docstring).
    "a 1 22  333   4444",
    "Roman Ⅻ, superscript ² and half ½",
]
# A whitespace character followed by a number: GPT-2's regex and SmolLM's disagree here.
_SPACE_BEFORE_NUMBER = re.compile(r"\s\d|\s[Ⅻ²½]")


@pytest.fixture(scope="module")
def tokenizer(default_model_path) -> Tokenizer:
    return Tokenizer.from_metadata(read_metadata(default_model_path), str(default_model_path))


@pytest.fixture(scope="module")
def transformers_tokenizer(default_model_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        str(default_model_path.parent), gguf_file=default_model_path.name)


@pytest.fixture(scope="module")
def smollm2_pipeline(transformers_tokenizer):
    """Oracle 2: the same vocabulary and merges behind SmolLM2's own pre-tokenizer (Digits, then ByteLevel)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    backend = Backend.from_str(transformers_tokenizer.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return backend


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_smollm2_pipeline(tokenizer, smollm2_pipeline, text):
    assert tokenizer.encode(text) == smollm2_pipeline.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("text", [t for t in TEXTS if not _SPACE_BEFORE_NUMBER.search(t)])
def test_ids_match_transformers_gguf_loader(tokenizer, transformers_tokenizer, text):
    assert tokenizer.encode(text) == transformers_tokenizer.encode(text, add_special_tokens=False)


def test_transformers_gguf_loader_splits_space_into_numbers(tokenizer, transformers_tokenizer):
    # Pins down the oracle's known defect so the exclusion above stays justified.
    text = "x  333"
    ours = tokenizer.encode(text)
    assert [tokenizer.id_to_piece(i) for i in ours] == ["x", "ĠĠ", "3", "3", "3"]
    theirs = transformers_tokenizer.encode(text, add_special_tokens=False)
    assert [tokenizer.id_to_piece(i) for i in theirs] == ["x", "Ġ", "Ġ", "3", "3", "3"]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_model_facts(tokenizer):
    assert tokenizer.vocab_size == 49152
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    assert tokenizer.add_bos is False  # the file says add_bos_token = false
    assert tokenizer.stop_ids == frozenset({0, 2})  # <|endoftext|> and <|im_end|>
    assert tokenizer.id_to_piece(1) == "<|im_start|>"
    assert tokenizer.id_to_piece(216) == "Ġ"


def test_special_tokens_in_text_become_single_ids(tokenizer):
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert [tokenizer.id_to_piece(i) for i in ids[1:-1]] == ["user", "Ċ", "hi"]


def test_decode_can_skip_special_tokens(tokenizer):
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>"


def test_bos_on_request(tokenizer):
    assert tokenizer.encode("hi", add_bos=True) == [1, *tokenizer.encode("hi")]


def test_stream_decoder_matches_decode_on_emoji(tokenizer):
    text = "family 👨‍👩‍👧‍👦 done"
    ids = tokenizer.encode(text)
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(i) for i in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + decoder.flush() == text


CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
]


def test_chat_template_renders_chatml(tokenizer):
    expected = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4.<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tokenizer.apply_chat_template(CONVERSATION) == expected
    assert tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=False) == expected.removesuffix(
        "<|im_start|>assistant\n")


def test_chat_template_matches_transformers(tokenizer, transformers_tokenizer):
    for add_generation_prompt in (True, False):
        theirs = transformers_tokenizer.apply_chat_template(
            CONVERSATION, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt) == theirs
