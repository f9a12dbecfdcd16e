"""File names for line-oriented output, quoted the way git quotes them.

Why: a name may contain a newline or any other byte but `/` and NUL, so printed raw it could forge
lines of its own (`foo\nD /etc/passwd`).  A name with a control character, `"`, `\\` or bytes that
are not UTF-8 is printed in double quotes with C escapes (`\\n`, `\\t`, `\\"`, `\\\\`, other bytes as
three octal digits); valid UTF-8 is kept as it is (git with core.quotePath=false).  Machine-readable
output (--json) carries the exact bytes instead.
"""

from __future__ import annotations

import re

_SPECIAL = re.compile(rb'[\x00-\x1f"\\\x7f-\xff]')
_CONTROL = re.compile(rb'[\x00-\x1f"\\\x7f]|\xc2[\x80-\x9f]')   # C0, DEL, C1 (U+0080..U+009F), " and \\
_ESCAPES = {0x07: b"\\a", 0x08: b"\\b", 0x09: b"\\t", 0x0A: b"\\n", 0x0B: b"\\v", 0x0C: b"\\f",
            0x0D: b"\\r", 0x22: b'\\"', 0x5C: b"\\\\"}
_UTF8_SEQ = re.compile(rb"[\xc2-\xdf][\x80-\xbf]|\xe0[\xa0-\xbf][\x80-\xbf]|[\xe1-\xec\xee\xef][\x80-\xbf]{2}"
                       rb"|\xed[\x80-\x9f][\x80-\xbf]|\xf0[\x90-\xbf][\x80-\xbf]{2}"
                       rb"|[\xf1-\xf3][\x80-\xbf]{3}|\xf4[\x80-\x8f][\x80-\xbf]{2}")


def needs_quoting(name: bytes) -> bool:
    """True when `name` printed raw could be misread: control characters (C0, DEL, C1), `"`, `\\`, or
    bytes that are not UTF-8."""
    if _SPECIAL.search(name) is None:
        return False
    if _CONTROL.search(name) is not None:
        return True
    try:  # only bytes >= 0x80: quoted when they are not UTF-8
        name.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def quote_path(name: bytes) -> bytes:
    """`name` as is, or C-quoted in double quotes when `needs_quoting(name)`."""
    if not needs_quoting(name):
        return name
    out = bytearray(b'"')
    i, n = 0, len(name)
    while i < n:
        c = name[i]
        if c >= 0x80:
            m = _UTF8_SEQ.match(name, i)
            if m is not None and not (c == 0xC2 and name[i + 1] < 0xA0):  # valid UTF-8, not C1: kept
                out += m.group()
                i = m.end()
                continue
            out += b"\\%03o" % c
        elif c in _ESCAPES:
            out += _ESCAPES[c]
        elif c < 0x20 or c == 0x7F:
            out += b"\\%03o" % c
        else:
            out.append(c)
        i += 1
    out += b'"'
    return bytes(out)
