"""Inconsistent or hostile tokenizer metadata is refused with an error naming the file, the key and the fault."""

from __future__ import annotations

import pytest
from vocab_files import byte_level_metadata, byte_level_tokens

from replayllm.errors import GGUFError, InvalidParameterError, UnsupportedError
from replayllm.tokenizer import Tokenizer

TOKENS, TYPES = byte_level_tokens()
N = len(TOKENS)


def spm_metadata(**changes) -> dict:
    tokens = ["<unk>", "<s>", "</s>", "<0x41>", "▁", "a"]
    metadata = {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [2, 3, 3, 6, 1, 1], "tokenizer.ggml.scores": [0.0] * 4 + [-1.0, -2.0],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
    }
    metadata.update(changes)
    return metadata


def without(metadata: dict, key: str) -> dict:
    return {k: v for k, v in metadata.items() if k != key}


HOSTILE = {
    "no tokens": (without(byte_level_metadata("qwen2"), "tokenizer.ggml.tokens"), "tokenizer.ggml.tokens", "missing"),
    "empty vocabulary": (byte_level_metadata("qwen2", **{"tokenizer.ggml.tokens": [],
                                                         "tokenizer.ggml.token_type": []}),
                         "tokenizer.ggml.tokens", "empty"),
    "tokens not an array": (byte_level_metadata("qwen2", **{"tokenizer.ggml.tokens": "abc"}),
                            "tokenizer.ggml.tokens", "expected an array"),
    "non-string token": (byte_level_metadata("qwen2", **{"tokenizer.ggml.tokens": [*TOKENS[:-1], 7]}),
                         "tokenizer.ggml.tokens", f"token {N - 1} is a int"),
    "duplicate token": (byte_level_metadata("qwen2", **{"tokenizer.ggml.tokens": [*TOKENS[:-1], TOKENS[0]]}),
                        "tokenizer.ggml.tokens", f"token {N - 1} {TOKENS[0]!r} repeats token 0"),
    "no token types": (without(byte_level_metadata("qwen2"), "tokenizer.ggml.token_type"),
                       "tokenizer.ggml.token_type", "missing"),
    "short token types": (byte_level_metadata("qwen2", **{"tokenizer.ggml.token_type": TYPES[:-1]}),
                          "tokenizer.ggml.token_type", f"has {N - 1} entries but the vocabulary has {N}"),
    "bad token type": (byte_level_metadata("qwen2", **{"tokenizer.ggml.token_type": [*TYPES[:-1], 9]}),
                       "tokenizer.ggml.token_type", f"entry {N - 1} is 9"),
    "no merges": (without(byte_level_metadata("qwen2"), "tokenizer.ggml.merges"), "tokenizer.ggml.merges", "missing"),
    "merge of an unknown token": (byte_level_metadata("qwen2", **{"tokenizer.ggml.merges": ["h e", "he zz"]}),
                                  "tokenizer.ggml.merges", "merge 1 'he zz' names 'zz'"),
    "merge result not in vocabulary": (byte_level_metadata("qwen2", **{"tokenizer.ggml.merges": ["q q"]}),
                                       "tokenizer.ggml.merges", "names 'qq'"),
    "merge without separator": (byte_level_metadata("qwen2", **{"tokenizer.ggml.merges": ["he"]}),
                                "tokenizer.ggml.merges", "not two tokens"),
    "non-string merge": (byte_level_metadata("qwen2", **{"tokenizer.ggml.merges": [3]}),
                         "tokenizer.ggml.merges", "merge 0 is a int"),
    "bos outside vocabulary": (byte_level_metadata("qwen2", **{"tokenizer.ggml.bos_token_id": N}),
                               "tokenizer.ggml.bos_token_id", f"id {N} is outside the vocabulary"),
    "eot not an integer": (byte_level_metadata("qwen2", **{"tokenizer.ggml.eot_token_id": "2"}),
                           "tokenizer.ggml.eot_token_id", "expected an integer"),
    "flag not a boolean": (byte_level_metadata("qwen2", **{"tokenizer.ggml.add_bos_token": 1}),
                           "tokenizer.ggml.add_bos_token", "expected a boolean"),
    "bos asked for but absent": (without(byte_level_metadata("qwen2", **{"tokenizer.ggml.add_bos_token": True}),
                                         "tokenizer.ggml.bos_token_id"),
                                 "tokenizer.ggml.add_bos_token", "no bos_token_id"),
    "template not a string": (byte_level_metadata("qwen2", **{"tokenizer.chat_template": ["x"]}),
                              "tokenizer.chat_template", "expected a string"),
    "pre not a string": (byte_level_metadata(None, **{"tokenizer.ggml.pre": 5}), "tokenizer.ggml.pre",
                         "expected a string"),
    "spm without scores": (without(spm_metadata(), "tokenizer.ggml.scores"), "tokenizer.ggml.scores", "missing"),
    "spm short scores": (spm_metadata(**{"tokenizer.ggml.scores": [0.0] * 5}), "tokenizer.ggml.scores",
                         "has 5 entries but the vocabulary has 6"),
    "spm NaN score": (spm_metadata(**{"tokenizer.ggml.scores": [0.0] * 5 + [float("nan")]}),
                      "tokenizer.ggml.scores", "entry 5 is nan"),
    "spm malformed byte token": (spm_metadata(**{"tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "<0xZZ>", "▁", "a"]}),
                                 "tokenizer.ggml.tokens", "token 3 '<0xZZ>' is typed BYTE"),
    "no model": (without(byte_level_metadata("qwen2"), "tokenizer.ggml.model"), "tokenizer.ggml.model", "missing"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_metadata_raises_gguf_error(case):
    metadata, field, reason = HOSTILE[case]
    with pytest.raises(GGUFError) as info:
        Tokenizer.from_metadata(metadata, "model.gguf")
    assert info.value.path == "model.gguf"
    assert info.value.field == field
    assert reason in info.value.reason


def test_metadata_must_be_a_dict():
    with pytest.raises(GGUFError, match="expected a dict"):
        Tokenizer.from_metadata([("tokenizer.ggml.model", "gpt2")], "model.gguf")


def test_unsupported_tokenizer_model():
    with pytest.raises(UnsupportedError, match="'bert' is not supported; supported: gpt2, llama"):
        Tokenizer.from_metadata(byte_level_metadata("qwen2", **{"tokenizer.ggml.model": "bert"}), "model.gguf")


def test_unknown_pre_tokenizer():
    with pytest.raises(UnsupportedError, match="pre-tokenizer 'mystery'"):
        Tokenizer.from_metadata(byte_level_metadata("mystery"), "model.gguf")


def test_missing_pre_tokenizer_means_default():
    tokenizer = Tokenizer.from_metadata(byte_level_metadata(None), "model.gguf")
    assert [tokenizer.id_to_piece(i) for i in tokenizer.encode("x 1")] == ["x", "Ġ1"]  # GPT-2 splitting


def test_empty_tokens_are_tolerated_and_never_produced():
    tokens = [*TOKENS, "", ""]
    metadata = byte_level_metadata("qwen2", **{"tokenizer.ggml.tokens": tokens,
                                               "tokenizer.ggml.token_type": [*TYPES, 1, 3]})
    tokenizer = Tokenizer.from_metadata(metadata, "model.gguf")
    assert tokenizer.vocab_size == N + 2
    assert tokenizer.decode([N, N + 1]) == ""
    assert all(i < N for i in tokenizer.encode("hello <|im_end|> world"))


@pytest.mark.parametrize("bad", [["a"], [1.5], [None], [True]])
def test_decode_rejects_bad_ids(bad):
    tokenizer = Tokenizer.from_metadata(byte_level_metadata("qwen2"), "model.gguf")
    with pytest.raises(InvalidParameterError):
        tokenizer.decode(bad)


def test_decode_rejects_ids_outside_vocabulary():
    tokenizer = Tokenizer.from_metadata(byte_level_metadata("qwen2"), "model.gguf")
    with pytest.raises(InvalidParameterError, match=f"token id {N} is outside the vocabulary"):
        tokenizer.decode([0, N])
    with pytest.raises(InvalidParameterError):
        tokenizer.id_to_piece(-1)


def test_encode_rejects_non_text():
    tokenizer = Tokenizer.from_metadata(byte_level_metadata("qwen2"), "model.gguf")
    with pytest.raises(InvalidParameterError, match="must be a str"):
        tokenizer.encode(b"bytes")
    with pytest.raises(InvalidParameterError, match="unpaired surrogate"):
        tokenizer.encode("a\ud800b")
    with pytest.raises(InvalidParameterError, match="no BOS"):
        Tokenizer.from_metadata(without(byte_level_metadata("qwen2"), "tokenizer.ggml.bos_token_id"),
                                "model.gguf").encode("x", add_bos=True)
