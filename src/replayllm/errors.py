"""Exceptions a user can act on.

Every error caused by the user's input (a file, a parameter, a prompt) is a `ReplayLLMError`.
The CLI prints such an error as one line `error: <message>` and exits with status 2; anything
else is a bug in replayllm and keeps its traceback.
"""

from __future__ import annotations

import os


class ReplayLLMError(Exception):
    """Base class of every error caused by user input."""


class GGUFError(ReplayLLMError):
    """A GGUF file was rejected: names the file, the field and the reason."""

    def __init__(self, path: str | os.PathLike, field: str, reason: str):
        self.path = os.fspath(path)
        self.field = field
        self.reason = reason
        super().__init__(f"{self.path}: {field}: {reason}")


class UnsupportedError(ReplayLLMError):
    """The input is valid but uses something replayllm does not implement (a tensor type, an architecture)."""


class InvalidParameterError(ReplayLLMError, ValueError):
    """A parameter given by the user is out of range or inconsistent."""


class PromptTooLongError(ReplayLLMError):
    """The prompt (plus the tokens to generate) does not fit the model's context."""


class ModelDownloadError(ReplayLLMError):
    """The default model could not be fetched or failed verification."""
