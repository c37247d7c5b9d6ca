"""Pre-tokenizers of byte-level BPE vocabularies, chosen by the GGUF key `tokenizer.ggml.pre`.

A byte-level BPE vocabulary only gives the ids its model was trained with if the text is first cut into
pieces exactly as at training time; merges never cross a piece boundary. Each name maps to llama.cpp's
list of regular expressions for it: the first splits the text, each next one splits every piece the
previous produced, and text between matches stays a piece of its own ("isolated" splitting).

An unknown name is refused (as llama.cpp does): ids from the wrong pre-tokenizer look plausible and are
silently wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Regex, pre_tokenizers

from ..errors import UnsupportedError

# GPT-2's pattern, as llama.cpp writes it (without the trailing `|\s+`, which changes nothing once the text
# between matches is kept as pieces).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"

# Llama 3: case-insensitive contractions, letters with one leading non-letter, digits in groups of up to 3,
# punctuation runs that swallow the newlines after them, newline runs with their leading blanks.
LLAMA3_PATTERN = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2: Llama 3's pattern with every digit a piece of its own.
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

# StarCoder / SmolLM: every digit is isolated first, then GPT-2's pattern runs on what is left.
SINGLE_DIGIT_PATTERN = r"\p{N}"


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How one family of vocabularies cuts text before BPE."""

    name: str
    patterns: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is a vocabulary token is taken whole, without merging
    add_bos_default: bool = False  # llama.cpp adds BOS for this family when the file has no add_bos_token

    def build(self) -> pre_tokenizers.PreTokenizer:
        """The `tokenizers` pre-tokenizer: the regex splits, then the GPT-2 byte-to-character mapping."""
        steps = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in self.patterns]
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False))
        return pre_tokenizers.Sequence(steps)


_GPT2 = PreTokenizerSpec("gpt-2", (GPT2_PATTERN,))
_LLAMA3 = PreTokenizerSpec("llama3", (LLAMA3_PATTERN,), ignore_merges=True, add_bos_default=True)
_QWEN2 = PreTokenizerSpec("qwen2", (QWEN2_PATTERN,))
_SMOLLM = PreTokenizerSpec("smollm", (SINGLE_DIGIT_PATTERN, GPT2_PATTERN))

# `tokenizer.ggml.pre` value -> spec. Aliases are the names llama.cpp files under the same regexes.
# "default" (and a file with no `pre` key, which predates the key) gets GPT-2's pattern: that is how such
# files were tokenized when they were written.
PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    "default": _GPT2,
    "gpt-2": _GPT2,
    "phi-2": _GPT2,
    "mpt": _GPT2,
    "olmo": _GPT2,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "llama-bpe": _LLAMA3,
    "falcon3": _LLAMA3,
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
    "stablelm2": _QWEN2,
    "smollm": _SMOLLM,
    "starcoder": _SMOLLM,
    "refact": _SMOLLM,
}


def resolve_pre_tokenizer(name: str | None, source: str) -> PreTokenizerSpec:
    """The spec for a `tokenizer.ggml.pre` value (None means "default"); UnsupportedError if unknown."""
    spec = PRE_TOKENIZERS.get("default" if name is None else name)
    if spec is None:
        raise UnsupportedError(
            f"{source}: pre-tokenizer {name!r} (tokenizer.ggml.pre) is not supported, and guessing would give "
            f"wrong token ids; supported: {', '.join(sorted(PRE_TOKENIZERS))}")
    return spec
