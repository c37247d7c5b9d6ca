"""Pre-tokenizers cut text where the vocabulary's training cut it: checked against splits worked out by
hand from each family's regex, and against a second regex engine (the `regex` package) on random text."""

from __future__ import annotations

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st
from vocab_files import spelled

from replayllm.errors import UnsupportedError
from replayllm.tokenizer.pretokenizers import PRE_TOKENIZERS, resolve_pre_tokenizer

SAMPLE = "It's 12345 HELLO'S\n\n  x"

# Worked out by hand from the regexes, written as plain text (the pre-tokenizer output is byte-spelled).
EXPECTED_SPLITS = {
    # Contractions in any case; digits in threes; a lone space before a digit stays alone; the newline run
    # is one piece and the blank before "x" joins it.
    "llama3": ["It", "'s", " ", "123", "45", " HELLO", "'S", "\n\n", " ", " x"],
    # As llama3 but each digit alone.
    "qwen2": ["It", "'s", " ", "1", "2", "3", "4", "5", " HELLO", "'S", "\n\n", " ", " x"],
    # Digits isolated first, then GPT-2: lower-case contractions only, "'" and "S" apart, and the whitespace
    # run keeps all but its last blank.
    "smollm": ["It", "'s", " ", "1", "2", "3", "4", "5", " HELLO", "'", "S", "\n\n ", " x"],
    # GPT-2: the space goes with the whole number.
    "gpt-2": ["It", "'s", " 12345", " HELLO", "'", "S", "\n\n ", " x"],
}


def pre_tokenize(name: str, text: str) -> list[str]:
    return [piece for piece, _ in PRE_TOKENIZERS[name].build().pre_tokenize_str(text)]


@pytest.mark.parametrize("name", sorted(EXPECTED_SPLITS))
def test_hand_derived_split(name):
    assert pre_tokenize(name, SAMPLE) == [spelled(p) for p in EXPECTED_SPLITS[name]]


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("llama3", "1234567", ["123", "456", "7"]),
    ("llama3", "don'T we'LL", ["don", "'T", " we", "'LL"]),
    ("llama3", "end.\n\nNext", ["end", ".\n\n", "Next"]),  # punctuation swallows the newlines after it
    ("llama3", "  (x)  ", [" ", " (", "x", ")", "  "]),
    ("llama3", "\r\n\r\n", ["\r\n\r\n"]),
    ("qwen2", "v2.10", ["v", "2", ".", "1", "0"]),
    ("qwen2", "(abc", ["(abc"]),  # one leading non-letter joins the letters
    ("gpt-2", "(abc", ["(", "abc"]),
    ("smollm", "x  12", ["x", "  ", "1", "2"]),  # the whole blank run, digits apart
    ("gpt-2", "x  12", ["x", " ", " 12"]),
])
def test_more_hand_derived_splits(name, text, expected):
    assert pre_tokenize(name, text) == [spelled(p) for p in expected]


def reference_split(patterns: tuple[str, ...], text: str) -> list[str]:
    """Isolated splitting with Python's `regex` engine: matches and the text between them become pieces."""
    pieces = [text]
    for pattern in patterns:
        compiled = regex.compile(pattern)
        cut = []
        for piece in pieces:
            position = 0
            for match in compiled.finditer(piece):
                if match.start() > position:
                    cut.append(piece[position:match.start()])
                cut.append(match.group())
                position = match.end()
            if position < len(piece):
                cut.append(piece[position:])
        pieces = cut
    return pieces


# Letters of several scripts and cases, digits and other numbers, contraction letters, punctuation,
# the whitespace characters the regexes treat specially, and characters beyond the BMP.
ALPHABET = "aZsStTdDlLmMvVeErRé中ا1٣²½'.,(-_ \t\n\r\u00a0\u3000😀🏽"


@pytest.mark.parametrize("name", ["llama3", "qwen2", "smollm", "gpt-2"])
@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=40))
def test_matches_second_regex_engine(name, text):
    spec = PRE_TOKENIZERS[name]
    assert pre_tokenize(name, text) == [spelled(p) for p in reference_split(spec.patterns, text)]


def test_aliases_share_regexes():
    assert resolve_pre_tokenizer("llama-bpe", "f.gguf") is resolve_pre_tokenizer("llama3", "f.gguf")
    assert resolve_pre_tokenizer("gpt-2", "f.gguf").patterns == resolve_pre_tokenizer("default", "f.gguf").patterns
    assert resolve_pre_tokenizer(None, "f.gguf") is resolve_pre_tokenizer("default", "f.gguf")
    assert resolve_pre_tokenizer("llama3", "f.gguf").ignore_merges
    assert not resolve_pre_tokenizer("qwen2", "f.gguf").ignore_merges


def test_unknown_pre_tokenizer_is_refused_with_the_supported_list():
    with pytest.raises(UnsupportedError) as info:
        resolve_pre_tokenizer("tekken", "model.gguf")
    message = str(info.value)
    assert "model.gguf" in message and "'tekken'" in message
    assert "llama3" in message and "qwen2" in message and "smollm" in message
