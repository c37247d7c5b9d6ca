"""Tokenizer built from a GGUF vocabulary, chat templates, and streaming UTF-8-safe decoding."""

from .chat import CHATML_TEMPLATE, render_chat
from .stream import StreamDecoder
from .tokenizer import Tokenizer

__all__ = ["CHATML_TEMPLATE", "StreamDecoder", "Tokenizer", "render_chat"]
