"""`SamplingParams`: how one request picks its tokens, validated once when it is built."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InvalidParameterError

# The penalty window is a fixed-width ring buffer on the device (see SamplerState); a longer window than this
# must use -1 (every token of the context), which needs no ring.
MAX_PENALTY_WINDOW = 4096
MAX_SEED = 2**63  # seeds are stored in int64 device tensors


@dataclass(frozen=True)
class SamplingParams:
    """Settings of one request.

    The sampler applies them in llama.cpp's default order: penalties -> top-k -> top-p -> min-p -> temperature
    -> draw. `temperature == 0` is greedy (argmax of the penalised logits, lowest id on ties); `top_k <= 0`,
    `top_p == 1` and `min_p == 0` switch those filters off. Penalties look at the last `penalty_last_n` tokens,
    prompt included (0: off, -1: the whole context). `seed=None` draws a fresh seed per request.
    """

    max_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, low=1)
        self._set_float("temperature", low=0.0)
        _check_int("top_k", self.top_k)
        top_p = self._set_float("top_p")
        if not 0.0 < top_p <= 1.0:
            raise InvalidParameterError(f"top_p must be in (0, 1] (1 switches it off), got {top_p}")
        min_p = self._set_float("min_p")
        if not 0.0 <= min_p <= 1.0:
            raise InvalidParameterError(f"min_p must be in [0, 1] (0 switches it off), got {min_p}")
        repetition_penalty = self._set_float("repetition_penalty")
        if repetition_penalty <= 0.0:
            raise InvalidParameterError(
                f"repetition_penalty must be > 0 (1 switches it off), got {repetition_penalty}")
        self._set_float("presence_penalty")
        self._set_float("frequency_penalty")
        _check_int("penalty_last_n", self.penalty_last_n, low=-1, high=MAX_PENALTY_WINDOW,
                   hint="0 switches penalties off, -1 uses the whole context")
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=MAX_SEED - 1)
        self._set_stop()
        if not isinstance(self.ignore_eos, bool):
            raise InvalidParameterError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def _set_float(self, name: str, low: float | None = None) -> float:
        """Check a real-valued field and store it as a float (so an int given for it compares and prints alike)."""
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidParameterError(f"{name} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise InvalidParameterError(f"{name} must be a finite number, got {value}")
        if low is not None and value < low:
            raise InvalidParameterError(f"{name} must be >= {low:g}, got {value:g}")
        object.__setattr__(self, name, value)
        return value

    def _set_stop(self) -> None:
        stop = self.stop
        if isinstance(stop, str):
            raise InvalidParameterError(
                f"stop must be a list or tuple of strings, got the single string {stop!r}; wrap it: [{stop!r}]")
        if not isinstance(stop, (list, tuple)):
            raise InvalidParameterError(f"stop must be a list or tuple of strings, got {type(stop).__name__}")
        for i, s in enumerate(stop):
            if not isinstance(s, str):
                raise InvalidParameterError(f"stop[{i}] must be a string, got {s!r}")
            if not s:
                raise InvalidParameterError(f"stop[{i}] is an empty string; stop strings must be non-empty")
        object.__setattr__(self, "stop", tuple(stop))


def _check_int(name: str, value, low: int | None = None, high: int | None = None, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameterError(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidParameterError(f"{name} must be {bounds}, got {value}" + (f" ({hint})" if hint else ""))
