"""composefs dump text (one line per inode, spec/STORES.md section 4) to and from the tree model.

Why a dump format at all: it is what `mkcomposefs --from-file` reads and `composefs-info dump` prints,
so images can be built from (and compared against) composefs' own tooling, and whole filesystems can be
described in a reviewable text file.

Line: `PATH SIZE MODE NLINK UID GID RDEV MTIME PAYLOAD CONTENT DIGEST [KEY=VALUE ...]`.

The parser is the hot path of `mkimage --from-dump` (tens of thousands of lines), so it works on bytes,
splits each line once and only unescapes lines that contain a backslash; the common numeric values
(modes, ids, mtimes) are converted once and memoised.  Anything the fast path does not accept is
re-examined by `_diagnose` so errors still name the exact problem and line.

Where it was built, a compiled parser (flatmount/image/_cwrite.c `parse_dump`; off with FLATMOUNT_PURE=1)
builds the same tree first.  It takes valid dumps only: on anything else (a syntax error, an unusual
field, a value out of its range) it gives up and the Python parser here, the specification and the
one place that words every error, parses the same bytes.  `@` hardlink lines are resolved here
(`_resolve_hardlinks`) either way.
"""

from __future__ import annotations

import gc
import io
import os
from collections.abc import Iterable
from typing import BinaryIO, TextIO

import flatmount.image.accel as accel
from flatmount.errors import DumpSyntaxError
from flatmount.image.tree import S_IFBLK, S_IFCHR, S_IFIFO, S_IFSOCK, Inode, lookup
from flatmount.image.tree import S_IFDIR as _S_IFDIR
from flatmount.image.tree import S_IFLNK as _S_IFLNK
from flatmount.image.tree import S_IFMT as _S_IFMT
from flatmount.image.tree import S_IFREG as _S_IFREG

MAX_LINE = 65535           # composefs refuses longer lines
MAX_CONTENT = 5000         # longest inline CONTENT field composefs accepts
NSEC = 1_000_000_000
# The image writer gives the root char-0:0 whiteouts `00`..`ff` (composefs does, see EROFS.md section 8),
# so the root's EROFS size, which composefs-info prints, counts them.
ROOT_WHITEOUTS = frozenset(b"%02x" % i for i in range(256))

_FILE_TYPES = frozenset((S_IFIFO, S_IFCHR, _S_IFDIR, S_IFBLK, _S_IFREG, _S_IFLNK, S_IFSOCK))
_BAD_NAMES = frozenset((b"", b".", b".."))
# Byte values for membership tests: `0x2F in data` takes bytes' memchr path at once, while `b"/" in data`
# first tries the needle as an integer and raises (and clears) a TypeError every time, 7x the cost.
_BACKSLASH = 0x5C
_HEX = frozenset(b"0123456789abcdefABCDEF")


# --- escaping ------------------------------------------------------------------------------------
# composefs-info: bytes outside isgraph() (0x21-0x7e) become \xHH, except \\ \n \r \t; `=` becomes
# \x3d in xattr keys and values (ESCAPE_EQUAL); an optional field whose value is `-` becomes \x2d.

def _escape_table(escape_equal: bool) -> list[bytes]:
    table = []
    for c in range(256):
        if c == 0x5C:
            table.append(b"\\\\")
        elif c == 0x0A:
            table.append(b"\\n")
        elif c == 0x0D:
            table.append(b"\\r")
        elif c == 0x09:
            table.append(b"\\t")
        elif 0x21 <= c <= 0x7E and not (escape_equal and c == 0x3D):
            table.append(bytes((c,)))
        else:
            table.append(b"\\x%02x" % c)
    return table


_ESC = _escape_table(False)
_ESC_EQ = _escape_table(True)
_SAFE = bytes(c for c in range(0x21, 0x7F) if c != 0x5C)           # bytes that never need escaping
_SAFE_EQ = bytes(c for c in _SAFE if c != 0x3D)
# translation tables marking each byte that needs escaping with 1 (and the others with 0): whether
# a value needs escaping is `1 in value.translate(table)`, several times cheaper than deleting the
# safe bytes (`translate(None, _SAFE)` builds its table again on every call)
_UNSAFE = bytes(0 if c in _SAFE else 1 for c in range(256))
_UNSAFE_EQ = bytes(0 if c in _SAFE_EQ else 1 for c in range(256))


def escape(value: bytes, escape_equal: bool = False) -> bytes:
    """A byte string as a dump field (no `-` handling; see `escape_optional`)."""
    if 1 not in value.translate(_UNSAFE_EQ if escape_equal else _UNSAFE):
        return value
    table = _ESC_EQ if escape_equal else _ESC
    return b"".join([table[c] for c in value])


def escape_optional(value: bytes | None) -> bytes:
    """PAYLOAD/CONTENT fields: None (or empty) is `-`, and a literal `-` is `\\x2d`."""
    if not value:
        return b"-"
    if value == b"-":
        return b"\\x2d"
    return escape(value)


_UNESCAPE_SIMPLE = {0x5C: 0x5C, 0x6E: 0x0A, 0x72: 0x0D, 0x74: 0x09}


def unescape(value: bytes) -> bytes:
    """Undo `escape`; raises ValueError on a malformed escape."""
    i = value.find(b"\\")
    if i < 0:
        return value
    out = bytearray(value[:i])
    n = len(value)
    while i < n:
        if value[i] != 0x5C:
            j = value.find(b"\\", i)
            if j < 0:
                j = n
            out += value[i:j]
            i = j
            continue
        if i + 1 >= n:
            raise ValueError("backslash at end of field")
        e = value[i + 1]
        simple = _UNESCAPE_SIMPLE.get(e)
        if simple is not None:
            out.append(simple)
            i += 2
        elif e == 0x78:  # x
            hh = value[i + 2:i + 4]
            if len(hh) != 2 or not all(c in _HEX for c in hh):
                raise ValueError(f"bad hex escape {value[i:i + 4]!r}")
            out.append(int(hh, 16))
            i += 4
        else:
            raise ValueError(f"unsupported escape \\{chr(e)}")
    return bytes(out)


def _unescape_optional(value: bytes) -> bytes | None:
    return None if value == b"-" else unescape(value)


# --- parsing -------------------------------------------------------------------------------------

class _Fixup:
    """A `@` hardlink line waiting for the whole tree (its target may come later in the file)."""

    __slots__ = ("lineno", "entries", "name", "target", "node", "done")

    def __init__(self, lineno: int, entries: dict, name: bytes, target: bytes, node: Inode):
        self.lineno = lineno
        self.entries = entries
        self.name = name
        self.target = target
        self.node = node          # placeholder occupying the name until resolved
        self.done = False


def _read_input(f) -> bytes:
    """All dump bytes from a stream/bytes/iterable of lines, gunzipped if gzip magic is present."""
    if isinstance(f, bytes | bytearray | memoryview):
        data = bytes(f)
    elif isinstance(f, str):
        raise TypeError("parse_dump takes a file object, bytes or an iterable of lines, not str")
    elif isinstance(f, os.PathLike):
        with open(f, "rb") as fh:
            data = fh.read()
    elif hasattr(f, "read"):
        data = f.read()
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
    else:
        parts = []
        for line in f:
            if isinstance(line, str):
                line = line.encode("utf-8", "surrogateescape")
            parts.append(line[:-1] if line.endswith(b"\n") else line)
        data = b"\n".join(parts)
    if data[:2] == b"\x1f\x8b":
        import gzip
        import zlib

        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DumpSyntaxError(f"corrupt gzip input: {e}") from None
    return data


def parse_dump(f: TextIO | BinaryIO | bytes | Iterable[str | bytes]) -> Inode:
    """The tree described by a composefs dump (text or binary stream, bytes, or lines; gzip ok)."""
    data = _read_input(f)
    # The tree has no reference cycles, and cyclic GC passes over tens of thousands of fresh inodes
    # would cost a quarter of the parse time, so GC is paused while building it.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        # the compiled parser (flatmount/image/_cwrite.c) takes a valid dump; anything else, and
        # with FLATMOUNT_PURE=1 everything, is parsed here, which words every error
        native = accel.CWRITE.parse_dump(data, Inode, _Fixup) if accel.CWRITE is not None else None
        if native is None:
            root = _parse_data(data)
        else:
            root, fixups = native
            if fixups:
                _resolve_hardlinks(root, fixups)
        # and once built, its objects are filed with the old ones at once (freeze then unfreeze
        # moves every young object to the oldest generation): otherwise the first young collection
        # after this returns walks them all, and the next one again (50-70 ms for 64k inodes)
        gc.freeze()
        gc.unfreeze()
        return root
    finally:
        if gc_was_enabled:
            gc.enable()


def _parse_data(data: bytes) -> Inode:
    """The Python parser (the specification of the compiled one): the tree, or the error."""
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()                       # the final newline is optional
    if b"\0" in data:
        raise _err(data.count(b"\n", 0, data.index(b"\0")) + 1, "NUL byte in line")
    if lines and max(map(len, lines)) > MAX_LINE:
        n = next(i for i, line in enumerate(lines, 1) if len(line) > MAX_LINE)
        raise _err(n, f"line longer than {MAX_LINE} bytes")
    return _parse_lines(lines)


def _err(lineno: int, msg: str) -> DumpSyntaxError:
    return DumpSyntaxError(f"dump line {lineno}: {msg}", lineno)


def _parse_lines(lines: list[bytes]) -> Inode:
    root: Inode | None = None
    dirs: dict[bytes, Inode] = {}        # unescaped path -> directory inode ("" is the root)
    fixups: list[_Fixup] = []
    modes: dict[bytes, int] = {}          # memo: MODE field -> validated int
    nums: dict[bytes, int] = {}           # memo: decimal field -> int
    mtimes: dict[bytes, int] = {}         # memo: MTIME field -> ns
    bad_names = _BAD_NAMES
    dash = b"-"
    S_IFMT, S_IFDIR, S_IFREG, S_IFLNK = _S_IFMT, _S_IFDIR, _S_IFREG, _S_IFLNK

    lineno = 0
    last_parent: bytes | None = None
    ents: dict[bytes, Inode] = {}
    for line in lines:
        lineno += 1
        fields = line.split(b" ")
        nfields = len(fields)
        if nfields == 11:
            path, size, mode, nlink, uid, gid, rdev, mtime, payload, content, digest = fields
        else:
            if nfields < 11:
                if nfields >= 9 and fields[2][:1] == b"@":
                    fields += [dash] * (11 - nfields)   # hardlink lines need only PATH..PAYLOAD
                else:
                    raise _diagnose(lineno, line)
            path, size, mode, nlink, uid, gid, rdev, mtime, payload, content, digest = fields[:11]
        escaped = _BACKSLASH in line

        m = modes.get(mode)
        if m is None:
            if mode[:1] == b"@":
                fix = _hardlink_line(lineno, line, fields, escaped, dirs)
                fixups.append(fix)
                continue
            m = _parse_mode(mode)
            if m is None:
                raise _diagnose(lineno, line)
            modes[mode] = m

        try:
            u = nums[uid]
            g = nums[gid]
            r = nums[rdev]
            nums[nlink]
        except KeyError:
            u = _num(nums, uid)
            g = _num(nums, gid)
            r = _num(nums, rdev)
            if u is None or g is None or r is None or _num(nums, nlink) is None:
                raise _diagnose(lineno, line) from None
        mt = mtimes.get(mtime)
        if mt is None:
            mt = _parse_mtime(mtime)
            if mt is None:
                raise _diagnose(lineno, line)
            mtimes[mtime] = mt

        if escaped:
            try:
                path = unescape(path)
                payload = _unescape_optional(payload)
                content = _unescape_optional(content)
                digest = _unescape_optional(digest)
            except ValueError as e:
                raise _err(lineno, str(e)) from None
            if b"\0" in path or (payload is not None and b"\0" in payload):
                raise _err(lineno, "NUL in path or PAYLOAD")
        else:
            if payload == dash:
                payload = None
            if content == dash:
                content = None
            if digest == dash:
                digest = None

        xattrs = _parse_xattrs(lineno, fields, escaped) if nfields > 11 else None

        ftype = m & S_IFMT
        target = cont = dig = pl = None
        sz = 0
        if ftype == S_IFREG:
            if size.isdigit():
                sz = int(size)
            else:
                raise _diagnose(lineno, line)
            if content is not None:
                if payload is not None or digest is not None:
                    raise _err(lineno, "CONTENT cannot be combined with PAYLOAD or DIGEST")
                if len(content) != sz:
                    raise _err(lineno, f"CONTENT is {len(content)} bytes but SIZE is {sz}")
                if sz > MAX_CONTENT:
                    raise _err(lineno, f"inline CONTENT longer than {MAX_CONTENT} bytes")
                cont = content
            if payload is not None:
                pl = payload.decode("utf-8", "surrogateescape")
            if digest is not None:
                if len(digest) != 64:
                    raise _err(lineno, "DIGEST must be 64 hex digits")
                try:
                    dig = bytes.fromhex(digest.decode("ascii"))
                except ValueError:
                    raise _err(lineno, "DIGEST must be 64 hex digits") from None
        elif ftype == S_IFDIR:
            if not size.isdigit():
                raise _diagnose(lineno, line)
            if payload is not None or content is not None or digest is not None:
                raise _err(lineno, "a directory has no PAYLOAD, CONTENT or DIGEST")
        elif ftype == S_IFLNK:
            if not size.isdigit():
                raise _diagnose(lineno, line)
            if payload is None:
                raise _err(lineno, "symlink without a target (PAYLOAD)")
            if content is not None or digest is not None:
                raise _err(lineno, "a symlink has no CONTENT or DIGEST")
            target = payload
            sz = len(payload)
        else:
            if size.isdigit():
                sz = int(size)
            else:
                raise _diagnose(lineno, line)
            if payload is not None or content is not None or digest is not None:
                raise _err(lineno, "a special file has no PAYLOAD, CONTENT or DIGEST")

        # each field set by name: a keyword call of a class first builds a dict of its arguments,
        # which doubles the cost of this line (64k lines a dump, tools/bench_image.py)
        node = Inode(m)
        node.uid = u
        node.gid = g
        node.mtime_ns = mt
        node.size = sz
        node.rdev = r
        if xattrs is not None:
            node.xattrs = xattrs
        node.target = target
        node.content = cont
        node.digest = dig
        node.payload = pl

        parent_path, sep, name = path.rpartition(b"/")
        if parent_path != last_parent or not sep or name in bad_names:
            parent = dirs.get(parent_path)
            if parent is None or name in bad_names or not sep:
                if path == b"/":
                    if ftype != S_IFDIR:
                        raise _err(lineno, "the root must be a directory")
                    if root is not None:
                        raise _err(lineno, "a second root line")
                    root = node
                    dirs[b""] = node
                    continue
                raise _path_error(lineno, path, dirs, root)
            last_parent = parent_path        # sorted dumps list a directory's entries together
            ents = parent.entries
        if ents.setdefault(name, node) is not node:
            raise _err(lineno, f"duplicate path {path!r}")
        if ftype == S_IFDIR:
            dirs[path] = node

    if root is None:
        raise DumpSyntaxError("dump has no root line (`/ ... 40755 ...`)", 0)
    if fixups:
        _resolve_hardlinks(root, fixups)
    return root


def _num(memo: dict[bytes, int], field: bytes) -> int | None:
    if not field.isdigit():
        return None
    v = memo[field] = int(field)
    return v


def _parse_mode(field: bytes) -> int | None:
    if not field.isdigit():
        return None
    try:
        m = int(field, 8)
    except ValueError:
        return None
    if m > 0o177777 or m & _S_IFMT not in _FILE_TYPES:
        return None
    return m


def _parse_mtime(field: bytes) -> int | None:
    sec, dot, nsec = field.partition(b".")
    if not dot or not nsec.isdigit():
        return None
    if not sec.isdigit() and not (sec[:1] == b"-" and sec[1:].isdigit()):
        return None
    ns = int(nsec)
    if ns >= NSEC:
        return None
    return int(sec) * NSEC + ns


def _parse_xattrs(lineno: int, fields: list[bytes], escaped: bool) -> dict[bytes, bytes]:
    xattrs: dict[bytes, bytes] = {}
    items = fields[11:]
    if items and not items[-1]:
        items.pop()                      # a single trailing space is tolerated (as composefs does)
    for item in items:
        key, sep, value = item.partition(b"=")
        if not sep or not key:
            raise _err(lineno, f"xattr {item!r} is not KEY=VALUE")
        if escaped:
            try:
                key = unescape(key)
                value = unescape(value)
            except ValueError as e:
                raise _err(lineno, str(e)) from None
            if b"\0" in key:
                raise _err(lineno, "NUL in xattr name")
        if key in xattrs:
            raise _err(lineno, f"duplicate xattr {key!r}")
        xattrs[key] = value
    return xattrs


def _hardlink_line(lineno: int, line: bytes, fields: list[bytes], escaped: bool,
                   dirs: dict[bytes, Inode]) -> _Fixup:
    path, mode, payload = fields[0], fields[2], fields[8]
    m = _parse_mode(mode[1:])
    if m is None:
        raise _err(lineno, f"bad MODE {mode!r}")
    if m & _S_IFMT == _S_IFDIR:
        raise _err(lineno, "directories cannot be hardlinked")
    try:
        path = unescape(path) if escaped else path
        target = _unescape_optional(payload) if escaped else (None if payload == b"-" else payload)
    except ValueError as e:
        raise _err(lineno, str(e)) from None
    if target is None:
        raise _err(lineno, "hardlink without a target path (PAYLOAD)")
    if b"\0" in path or b"\0" in target:
        raise _err(lineno, "NUL in path")
    parent_path, sep, name = path.rpartition(b"/")
    parent = dirs.get(parent_path)
    if parent is None or name in _BAD_NAMES or not sep:
        raise _path_error(lineno, path, dirs, dirs.get(b""))
    if target.strip(b"/") == path.strip(b"/"):
        raise _err(lineno, "hardlink to itself")
    placeholder = Inode(m)
    if parent.entries.setdefault(name, placeholder) is not placeholder:
        raise _err(lineno, f"duplicate path {path!r}")
    return _Fixup(lineno, parent.entries, name, target, placeholder)


def _resolve_hardlinks(root: Inode, fixups: list[_Fixup]) -> None:
    """Point every `@` name at its target inode; chains of `@` lines are followed, cycles refused."""
    pending = {id(f.node): f for f in fixups}
    for fix in fixups:
        chain: list[_Fixup] = []
        cur = fix
        while True:
            if cur.done:
                target = cur.entries[cur.name]
                break
            if cur in chain:
                raise _err(fix.lineno, "hardlink cycle" if len(chain) > 1 else "hardlink to itself")
            chain.append(cur)
            target = _lookup(root, cur.target)
            if target is None:
                raise _err(cur.lineno, f"hardlink target {cur.target!r} does not exist")
            nxt = pending.get(id(target))
            if nxt is None or nxt.node is not target:
                break
            cur = nxt
        if target.entries is not None:
            raise _err(chain[-1].lineno if chain else fix.lineno, "directories cannot be hardlinked")
        for c in chain:
            c.entries[c.name] = target
            c.done = True


def _lookup(root: Inode, path: bytes) -> Inode | None:
    """tree.lookup, with a `.`/`..` component meaning "no such path" (reported by the caller)."""
    try:
        return lookup(root, path)
    except ValueError:
        return None


def _path_error(lineno: int, path: bytes, dirs: dict[bytes, Inode], root: Inode | None) -> DumpSyntaxError:
    if b"\0" in path:
        return _err(lineno, "NUL in path")
    if not path.startswith(b"/"):
        return _err(lineno, f"path {path!r} is not absolute")
    if path == b"/":
        return _err(lineno, "a second root line" if root is not None else "the root must come first")
    names = path[1:].split(b"/")
    for n in names:
        if n in _BAD_NAMES:
            return _err(lineno, f"path {path!r} has an empty, `.` or `..` component")
    if root is None:
        return _err(lineno, "the root line `/` must come first")
    parent = _lookup(root, b"/".join(names[:-1]))
    if parent is not None and parent.entries is None:
        return _err(lineno, f"parent of {path!r} is not a directory")
    return _err(lineno, f"parent directory of {path!r} is missing")


def _diagnose(lineno: int, line: bytes) -> DumpSyntaxError:
    """A precise error for a line the fast path refused."""
    fields = line.split(b" ")
    if not line:
        return _err(lineno, "empty line")
    if len(fields) < 11:
        return _err(lineno, f"{len(fields)} fields, need at least 11 (PATH SIZE MODE NLINK UID GID "
                            "RDEV MTIME PAYLOAD CONTENT DIGEST)")
    names = ("SIZE", "MODE", "NLINK", "UID", "GID", "RDEV", "MTIME")
    for name, value in zip(names, fields[1:8], strict=True):
        if name == "MODE":
            if _parse_mode(value) is None:
                return _err(lineno, f"bad MODE {value!r} (octal st_mode of a known file type)")
        elif name == "MTIME":
            if _parse_mtime(value) is None:
                return _err(lineno, f"bad MTIME {value!r} (SEC.NSEC, NSEC < 10^9)")
        elif not value.isdigit():
            return _err(lineno, f"bad {name} {value!r} (decimal integer)")
    return _err(lineno, "malformed line")


# --- writing -------------------------------------------------------------------------------------

def write_dump(root: Inode, out: BinaryIO) -> None:
    """Write the dump of `root`: depth-first, children in byte order, later hardlink names as `@`.

    `composefs-info dump` speed matters here (a 64k-inode image is dumped in a fraction of a second),
    so the common line (a regular file named once) is formatted in the walk itself, and the escaped
    forms of xattr entries, mtimes and digests' object paths, which repeat across inodes, are memoised.
    Faster still, where it was built, the compiled writer (image/_cread.c) formats the whole text by
    the same rules; it gives up (None) on any tree it does not fully take (a value of another type, an
    empty symlink target, ...), and this code then writes it and raises what it raises.
    """
    if accel.CREAD is not None:   # the compiled writer: None unless it took the whole tree
        text = accel.CREAD.dump(root)
        if text is not None:
            out.write(text)
            return
    from flatmount.image.writer import dir_size

    if root.entries is None:
        raise TypeError("the root of a tree must be a directory")
    links = _count_links(root)
    first: dict[int, bytes] = {}          # id(inode) -> escaped path of its first name
    buf: list[bytes] = []
    write = out.write
    esc = escape
    unsafe = _UNSAFE
    xmemo: dict[tuple[bytes, bytes], bytes] = {}   # (name, value) -> b" name=value", escaped
    tmemo: dict[int, bytes] = {}                   # mtime_ns -> b"sec.nsec"

    def xattr_text(xattrs: dict[bytes, bytes]) -> bytes:
        parts = []
        for kv in sorted(xattrs.items()):
            t = xmemo.get(kv)
            if t is None:
                t = b" " + esc(kv[0], True) + b"=" + esc(kv[1], True)
                if len(xmemo) < 65536:
                    xmemo[kv] = t
            parts.append(t)
        return b"".join(parts)

    def mtime_text(mtime_ns: int) -> bytes:
        t = tmemo.get(mtime_ns)
        if t is None:
            sec, nsec = divmod(mtime_ns, NSEC)
            t = b"%d.%d" % (sec, nsec)
            if len(tmemo) < 65536:
                tmemo[mtime_ns] = t
        return t

    def line(path_esc: bytes, node: Inode) -> bytes:
        mode = node.mode
        ftype = mode & _S_IFMT
        payload = content = None
        digest = b"-"
        if ftype == _S_IFDIR:
            ents = node.entries
            size = dir_size(ents if node is not root else ents.keys() | ROOT_WHITEOUTS)
            nlink = 2 + sum(1 for c in ents.values() if c.entries is not None)
        else:
            nlink = links[id(node)]
            if ftype == _S_IFREG:
                content = node.content
                size = len(content) if content else node.size
                payload = node.payload
                if payload is not None:
                    payload = payload.encode("utf-8", "surrogateescape")
                if node.digest is not None:
                    digest = node.digest.hex().encode()
                    if payload is None:
                        payload = digest[:2] + b"/" + digest[2:]
            elif ftype == _S_IFLNK:
                payload = node.target
                if not payload:
                    raise ValueError(f"symlink {path_esc!r} has an empty target")
                size = len(payload)
            else:
                size = node.size
        text = b"%s %d %o %d %d %d %d %s %s %s %s" % (
            path_esc, size, mode, nlink, node.uid, node.gid, node.rdev, mtime_text(node.mtime_ns),
            escape_optional(payload), escape_optional(content), digest)
        if node.xattrs:
            text += xattr_text(node.xattrs)
        return text

    append = buf.append
    append(line(b"/", root))
    # iterative depth-first walk; each stack item is (escaped dir path, entries, sorted names, next index)
    stack = [(b"", root.entries, sorted(root.entries), 0)]
    while stack:
        base, ents, names, start = stack.pop()
        prefix = base + b"/"
        for i in range(start, len(names)):
            name = names[i]
            child = ents[name]
            path_esc = prefix + (name if 1 not in name.translate(unsafe) else esc(name))
            if child.entries is None:
                cid = id(child)
                ftype = child.mode & _S_IFMT
                if ftype == _S_IFLNK and links[cid] == 1 and child.target:
                    # a symlink named once, as `line` would format it
                    target = child.target
                    text = b"%s %d %o 1 %d %d %d %s %s - -" % (
                        path_esc, len(target), child.mode, child.uid, child.gid, child.rdev,
                        mtime_text(child.mtime_ns), escape_optional(target))
                    xattrs = child.xattrs
                    append(text + xattr_text(xattrs) if xattrs else text)
                    continue
                if ftype == _S_IFREG and links[cid] == 1:
                    # the common line (a regular file named once), as `line` would format it
                    dg = child.digest
                    pl = child.payload
                    content = child.content
                    if pl is not None:
                        pl = pl.encode("utf-8", "surrogateescape")
                        if not pl or pl == b"-" or 1 in pl.translate(unsafe):
                            pl = escape_optional(pl)
                        text = b"%s %d %o 1 %d %d %d %s %s %s %s" % (
                            path_esc, len(content) if content else child.size, child.mode, child.uid,
                            child.gid, child.rdev, mtime_text(child.mtime_ns), pl,
                            escape_optional(content), b"-" if dg is None else dg.hex().encode())
                    elif dg is not None:
                        hx = dg.hex().encode()
                        text = b"%s %d %o 1 %d %d %d %s %s/%s %s %s" % (
                            path_esc, len(content) if content else child.size, child.mode, child.uid,
                            child.gid, child.rdev, mtime_text(child.mtime_ns), hx[:2], hx[2:],
                            escape_optional(content), hx)
                    else:
                        text = b"%s %d %o 1 %d %d %d %s - %s -" % (
                            path_esc, len(content) if content else child.size, child.mode, child.uid,
                            child.gid, child.rdev, mtime_text(child.mtime_ns), escape_optional(content))
                    xattrs = child.xattrs
                    append(text + xattr_text(xattrs) if xattrs else text)
                    continue
                prev = first.get(cid)
                if prev is None:
                    if links[cid] > 1:
                        first[cid] = path_esc
                    append(line(path_esc, child))
                else:
                    text = line(path_esc, child)
                    f = text.split(b" ", 11)
                    f[2] = b"@" + f[2]
                    f[8] = prev
                    append(b" ".join(f))
            else:
                append(line(path_esc, child))
                if child.entries:
                    if i + 1 < len(names):
                        stack.append((base, ents, names, i + 1))
                    stack.append((path_esc, child.entries, sorted(child.entries), 0))
                    break
        if len(buf) >= 4096:
            append(b"")
            write(b"\n".join(buf))
            buf.clear()
    if buf:
        append(b"")
        write(b"\n".join(buf))


def _count_links(root: Inode) -> dict[int, int]:
    """id(inode) -> number of names, for every inode below `root` (a directory counts its one name).

    C-level counting per directory (a whole-tree pass ahead of every dump); a directory without
    entries needs no visit, so `filter` by `entries` truthiness picks the ones to descend into."""
    from collections import Counter
    from operator import attrgetter

    counts: Counter[int] = Counter()
    update = counts.update
    has_entries = attrgetter("entries")
    dirs = [root]
    for node in dirs:
        children = node.entries.values()
        update(map(id, children))
        dirs.extend(filter(has_entries, children))
    return counts


def dump_bytes(root: Inode) -> bytes:
    """The dump of `root` as bytes."""
    buf = io.BytesIO()
    write_dump(root, buf)
    return buf.getvalue()
