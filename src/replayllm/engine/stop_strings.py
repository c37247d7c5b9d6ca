"""Stop-string detection over streamed text.

Text is released only when no stop string can still start inside it, so a stream never shows the beginning
of a stop string that later completes.
"""

from __future__ import annotations


class StopStringFilter:
    def __init__(self, stop: tuple[str, ...]):
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=0)
        self._pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Feed newly decoded text; return what is safe to show. Sets `stopped` when a stop string appears."""
        if not self._stop:
            return text
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self._pending = self._pending[: min(hits)], ""
            return out
        safe = len(self._pending) - (self._hold - 1)
        # Keep back only a tail that is a prefix of some stop string.
        cut = max(safe, 0)
        while cut < len(self._pending) and not any(s.startswith(self._pending[cut:]) for s in self._stop):
            cut += 1
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out
