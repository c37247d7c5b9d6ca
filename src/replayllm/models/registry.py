"""The supported architectures, keyed by GGUF `general.architecture` (never guessed from a file name)."""

from __future__ import annotations

from ..errors import UnsupportedError
from .llama import LLAMA
from .qwen2 import QWEN2
from .qwen3 import QWEN3
from .transformer import Architecture

ARCHITECTURES: dict[str, Architecture] = {arch.name: arch for arch in (LLAMA, QWEN2, QWEN3)}


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def get_architecture(name: str) -> Architecture:
    """The registered architecture `name`; UnsupportedError listing the supported ones otherwise."""
    try:
        return ARCHITECTURES[name]
    except (KeyError, TypeError):
        raise UnsupportedError(
            f"architecture {name!r} is not supported; supported: {', '.join(supported_architectures())}"
        ) from None
