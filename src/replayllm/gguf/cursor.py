"""A bounds-checked little-endian reader over the bytes of a GGUF file.

Every read first checks that the bytes it needs exist, so a length or count taken from the file can never make
the parser read past the end or allocate more than the file holds.
"""

from __future__ import annotations

import os
import struct

from ..errors import GGUFError

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def printable(name: str, limit: int = 80) -> str:
    """`name` made safe for a one-line message: control characters escaped, long names cut."""
    text = name if name.isprintable() else name.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."


class ByteCursor:
    """Reads values in order from `buf` (bytes, mmap, ...), raising `GGUFError` on anything malformed."""

    def __init__(self, buf, path: str | os.PathLike, pos: int = 0):
        self.buf = buf
        self.path = os.fspath(path)
        self.pos = pos
        self.size = len(buf)

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def error(self, field: str, reason: str) -> GGUFError:
        return GGUFError(self.path, field, reason)

    def skip(self, nbytes: int, field: str) -> int:
        """Advance past `nbytes` bytes and return the offset where they start."""
        if nbytes > self.remaining:
            raise self.error(field, f"needs {nbytes} bytes at offset {self.pos} but the file ends at {self.size} "
                                    "(truncated or corrupt file)")
        start = self.pos
        self.pos += nbytes
        return start

    def unpack(self, fmt: struct.Struct, field: str):
        return fmt.unpack_from(self.buf, self.skip(fmt.size, field))[0]

    def u32(self, field: str) -> int:
        return self.unpack(_U32, field)

    def u64(self, field: str) -> int:
        return self.unpack(_U64, field)

    def raw(self, nbytes: int, field: str) -> bytes:
        start = self.skip(nbytes, field)
        return self.buf[start:start + nbytes]

    def string(self, field: str, max_bytes: int) -> str:
        """A GGUF string: u64 byte length, then that many bytes of UTF-8."""
        length = self.u64(field)
        if length > max_bytes:
            raise self.error(field, f"string length {length} is over the limit of {max_bytes} bytes")
        data = self.raw(length, field)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.error(field, f"string is not valid UTF-8 (bad byte at position {e.start})") from None
