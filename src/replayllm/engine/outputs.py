"""What a generation returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length"]


@dataclass
class GenerationOutput:
    """One prompt's result.

    `finish_reason` is "stop" when an end-of-generation token or a stop string ended it, "length" when
    `max_tokens` or the context window did. `token_ids` are the generated ids, without the ending stop token.
    """

    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
