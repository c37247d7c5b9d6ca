"""A small JSON file of measured choices, shared by the load-time tunings (prefill methods, decode GEMV shapes).

A missing file is an empty cache; an unreadable one too, with a warning (the choices are measured again and
the file rewritten). Writes replace the file atomically, so a reader never sees half of one, and a folder that
cannot be written costs a re-measurement next time, nothing else.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path


class JsonCache:
    """`entries` (str -> dict) kept in `path` as {"version": VERSION, "entries": ...}; a file of another version
    is an empty cache. Subclasses name what they keep (`WHAT`, for warnings) and give typed get / put."""

    VERSION = 1
    WHAT = "tuning cache"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        self.changed = False
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") == self.VERSION and isinstance(data.get("entries"), dict):
                self.entries = data["entries"]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as exc:
            warnings.warn(f"{self.WHAT} {self.path} is unreadable ({exc!r:.100}); measuring again", stacklevel=3)

    def put_entry(self, key: str, entry: dict) -> None:
        self.entries[key] = entry
        self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as f:
                json.dump({"version": self.VERSION, "entries": self.entries}, f, indent=1)
            os.replace(f.name, self.path)
            self.changed = False
        except OSError as exc:
            warnings.warn(f"could not write the {self.WHAT} {self.path} ({exc!r:.100})", stacklevel=2)
