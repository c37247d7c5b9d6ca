"""Open a GGUF model: validated header, model configuration and tokenizer, before any weight is touched."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ReplayLLMError
from ..gguf import GGUFFile, read_gguf
from ..models import ModelConfig
from ..tokenizer import Tokenizer


@dataclass
class ModelFile:
    gguf: GGUFFile
    config: ModelConfig
    tokenizer: Tokenizer

    @property
    def path(self) -> str:
        return self.gguf.path

    def close(self) -> None:
        self.gguf.close()


def open_model_file(path: str | os.PathLike) -> ModelFile:
    path = Path(path)
    if not path.exists():
        raise ReplayLLMError(f"{path}: no such file")
    if not path.is_file():
        raise ReplayLLMError(f"{path}: not a file")
    gguf_file = read_gguf(path)
    try:
        shapes = {name: info.shape for name, info in gguf_file.tensors.items()}
        config = ModelConfig.from_metadata(gguf_file.metadata, shapes, gguf_file.path)
        tokenizer = Tokenizer.from_metadata(gguf_file.metadata, gguf_file.path)
    except BaseException:
        gguf_file.close()
        raise
    return ModelFile(gguf_file, config, tokenizer)
