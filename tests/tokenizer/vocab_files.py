"""Helpers for the tokenizer tests: GGUF metadata in and out of real files, and small synthetic vocabularies."""

from __future__ import annotations

import functools
from pathlib import Path

import gguf

from replayllm.gguf import read_gguf

# GPT-2's byte alphabet, written out independently of replayllm: the printable Latin-1 bytes spell
# themselves, the other 68 bytes take U+0100.. in byte order.
_PRINTABLE = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
BYTE_CHARS = {b: chr(b) for b in _PRINTABLE}
BYTE_CHARS.update({b: chr(0x100 + n) for n, b in enumerate(b for b in range(256) if b not in BYTE_CHARS)})


def spelled(text: str) -> str:
    """How a byte-level vocabulary writes `text`: spelled("a b\n") == "aĠbĊ"."""
    return "".join(BYTE_CHARS[b] for b in text.encode("utf-8"))


def read_metadata(path: str | Path) -> dict:
    """All metadata of a GGUF file as plain Python values (lists for arrays), as the engine reads it."""
    with read_gguf(path) as gguf_file:
        return dict(gguf_file.metadata)


def write_metadata(path: Path, metadata: dict, arch: str = "llama") -> Path:
    """A GGUF file with these metadata keys and no tensors."""
    writer = gguf.GGUFWriter(str(path), arch=arch)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, list(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# A byte-level vocabulary small enough to reason about by hand. Its merges would cross every boundary a
# pre-tokenizer draws (digit runs, a space before a digit, contractions, whitespace runs, punctuation
# before letters), so ids show exactly where the text was cut.
BYTE_LEVEL_MERGES = [
    ("1", "2"), ("12", "3"), ("123", "4"), ("4", "5"), ("3", "4"), ("Ġ", "1"),
    ("'", "s"), ("'", "S"), ("'", "t"), ("Ġ", "Ġ"), ("ĠĠ", "Ġ"), ("Ċ", "Ċ"), ("Ġ", "Ċ"), ("ĉ", "ĉ"),
    ("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "hello"), ("o", "Ġ"),
    ("Ġ", "w"), ("o", "r"), ("Ġw", "or"), ("l", "d"), ("Ġwor", "ld"), ("(", "x"), (".", "Ċ"), ("Ġ", "("),
    ("Ã", "©"), ("x", "y"), ("xy", "z"), ("I", "t"), ("Ġ", "I"),
]
BYTE_LEVEL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BYTE_LEVEL_USER_DEFINED = ["<tool>"]
# Reachable by no merge: only a pre-tokenizer that takes whole-word matches (Llama 3's) can produce it.
UNREACHABLE_TOKEN = "xyzw"


@functools.cache
def byte_level_tokens() -> tuple[list[str], list[int]]:
    tokens = [BYTE_CHARS[b] for b in range(256)] + [a + b for a, b in BYTE_LEVEL_MERGES]
    types = [1] * len(tokens)
    for extra, token_type in ((BYTE_LEVEL_SPECIALS, 3), (BYTE_LEVEL_USER_DEFINED, 4), ([UNREACHABLE_TOKEN], 1)):
        tokens += extra
        types += [token_type] * len(extra)
    return tokens, types


def byte_level_metadata(pre: str | None, **extra) -> dict:
    """Metadata of the small byte-level vocabulary with pre-tokenizer `pre` (None: key absent)."""
    tokens, types = byte_level_tokens()
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": list(tokens),
        "tokenizer.ggml.token_type": list(types),
        "tokenizer.ggml.merges": [f"{a} {b}" for a, b in BYTE_LEVEL_MERGES],
        "tokenizer.ggml.bos_token_id": tokens.index("<|endoftext|>"),
        "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>"),
    }
    if pre is not None:
        metadata["tokenizer.ggml.pre"] = pre
    metadata.update(extra)
    return metadata
