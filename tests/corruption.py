"""Damage for the cache-format property tests: what a torn write, a bad disk or another user's
crafted file does to bytes that a decoder must refuse without crashing."""

from __future__ import annotations

import struct

from hypothesis import strategies as st

HOW = ("flip", "truncate", "insert", "delete", "u32")


def damaged(good: bytes, data: st.DataObject, u32_from: int = 0) -> bytearray:
    """`good` with one flipped byte, a cut, bytes inserted or deleted, or a plausible-looking u32
    (a count or length: 0, 1, big) written at or after `u32_from`."""
    buf = bytearray(good)
    how = data.draw(st.sampled_from(HOW))
    pos = data.draw(st.integers(0, len(buf) - 1))
    if how == "flip":
        buf[pos] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        del buf[pos:]
    elif how == "insert":
        buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    elif how == "delete":
        del buf[pos:pos + data.draw(st.integers(1, 8))]
    else:
        pos = data.draw(st.integers(u32_from, max(u32_from, len(buf) - 4)))
        buf[pos:pos + 4] = struct.pack("<I", data.draw(st.sampled_from([0, 1, 255, 1 << 20, 2**32 - 1])))
    return buf
