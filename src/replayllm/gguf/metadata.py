"""The key-value section of a GGUF file: typed values decoded into plain Python objects.

Values become str, int, float or bool; arrays become lists of those. Arrays of arrays are rejected: no model
format uses them and they would let a tiny file describe a huge tree.
"""

from __future__ import annotations

import struct

import numpy as np
from gguf import GGUFValueType

from .cursor import ByteCursor, printable

MAX_KEY_BYTES = 64 * 1024
MAX_STRING_BYTES = 16 * 1024 * 1024
MAX_ARRAY_ELEMENTS = 2**24

# The smallest possible key-value entry: key length (u64) + 1 key byte + value type (u32) + a 1-byte value.
MIN_KV_BYTES = 8 + 1 + 4 + 1

_V = GGUFValueType
# Fixed-size value types: (struct format of one value, numpy dtype of an array of them).
_SCALARS: dict[GGUFValueType, tuple[struct.Struct, str]] = {
    _V.UINT8: (struct.Struct("<B"), "<u1"),
    _V.INT8: (struct.Struct("<b"), "<i1"),
    _V.UINT16: (struct.Struct("<H"), "<u2"),
    _V.INT16: (struct.Struct("<h"), "<i2"),
    _V.UINT32: (struct.Struct("<I"), "<u4"),
    _V.INT32: (struct.Struct("<i"), "<i4"),
    _V.UINT64: (struct.Struct("<Q"), "<u8"),
    _V.INT64: (struct.Struct("<q"), "<i8"),
    _V.FLOAT32: (struct.Struct("<f"), "<f4"),
    _V.FLOAT64: (struct.Struct("<d"), "<f8"),
    _V.BOOL: (struct.Struct("<B"), "<u1"),
}
_STRING_LENGTH = struct.Struct("<Q")


def read_metadata(cur: ByteCursor, n_kv: int) -> tuple[dict[str, object], dict[str, GGUFValueType]]:
    """Read `n_kv` entries at the cursor: (values by key in file order, the stored value type of each key)."""
    values: dict[str, object] = {}
    types: dict[str, GGUFValueType] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata[#{i}].key", MAX_KEY_BYTES)
        field = f"metadata[{printable(key)}]"
        if not key:
            raise cur.error(f"metadata[#{i}].key", "key is empty")
        if key in values:
            raise cur.error(field, "key appears twice")
        value_type = _value_type(cur, field + ".type")
        values[key] = _read_value(cur, value_type, field)
        types[key] = value_type
    return values, types


def _value_type(cur: ByteCursor, field: str) -> GGUFValueType:
    code = cur.u32(field)
    try:
        return GGUFValueType(code)
    except ValueError:
        raise cur.error(field, f"unknown value type {code} (known: 0 to {max(GGUFValueType)})") from None


def _read_value(cur: ByteCursor, value_type: GGUFValueType, field: str) -> object:
    if value_type == _V.STRING:
        return cur.string(field, MAX_STRING_BYTES)
    if value_type == _V.ARRAY:
        return _read_array(cur, field)
    fmt, _ = _SCALARS[value_type]
    value = cur.unpack(fmt, field)
    if value_type == _V.BOOL:
        return _as_bool(cur, value, field)
    return value


def _as_bool(cur: ByteCursor, byte: int, field: str) -> bool:
    if byte > 1:
        raise cur.error(field, f"bool value is {byte}; a GGUF bool is stored as 0 or 1")
    return bool(byte)


def _read_array(cur: ByteCursor, field: str) -> list:
    element_type = _value_type(cur, field + ".element_type")
    if element_type == _V.ARRAY:
        raise cur.error(field, "arrays of arrays are not supported")
    length = cur.u64(field + ".length")
    if length > MAX_ARRAY_ELEMENTS:
        raise cur.error(field, f"array length {length} is over the limit of {MAX_ARRAY_ELEMENTS} elements")
    min_element_bytes = _STRING_LENGTH.size if element_type == _V.STRING else _SCALARS[element_type][0].size
    if length * min_element_bytes > cur.remaining:
        raise cur.error(field, f"array of {length} {element_type.name} elements needs at least "
                               f"{length * min_element_bytes} bytes but only {cur.remaining} are left in the file")
    if element_type == _V.STRING:
        return _read_string_array(cur, length, field)
    fmt, dtype = _SCALARS[element_type]
    items = np.frombuffer(cur.raw(length * fmt.size, field), dtype=dtype)
    if element_type == _V.BOOL:
        if length and int(items.max()) > 1:
            raise cur.error(field, f"bool element is {int(items.max())}; a GGUF bool is stored as 0 or 1")
        items = items.astype(bool)
    return items.tolist()


def _read_string_array(cur: ByteCursor, length: int, field: str) -> list[str]:
    # The hot loop of reading a vocabulary (10^5 strings): locals, one bounds check per string.
    buf, pos, size = cur.buf, cur.pos, cur.size
    unpack_length = _STRING_LENGTH.unpack_from
    out: list[str] = []
    append = out.append
    for i in range(length):
        if pos + 8 > size:
            cur.pos = pos
            cur.skip(8, f"{field}[{i}]")  # raises with the standard message
        (n,) = unpack_length(buf, pos)
        pos += 8
        if n > MAX_STRING_BYTES or pos + n > size:
            cur.pos = pos - 8
            cur.string(f"{field}[{i}]", MAX_STRING_BYTES)  # raises with the standard message
        try:
            append(buf[pos:pos + n].decode("utf-8"))
        except UnicodeDecodeError as e:
            raise cur.error(f"{field}[{i}]", f"string is not valid UTF-8 (bad byte at position {e.start})") from None
        pos += n
    cur.pos = pos
    return out
