"""Rebuild a c/storage layer's original tar stream from its tar-split data and its diff dir.

Why: a containers-storage layer's `diff-digest` is only a claim written in layers.json.  c/storage
keeps, for every layer it created from a tar, `overlay-layers/<id>.tar-split.gz`: the tar stream with
the file contents cut out, so the exact stream can be put back together (that is how c/storage itself
exports a layer with its original digest).  Reassembling it from the diff dir's files and hashing it
proves the diff_id; importing the layer FROM that stream (not from a scan of the diff dir) makes what
is recorded exactly what was hashed, so nothing planted in the diff dir (extra files, modes, owners,
xattrs, symlinks) can ride along under a genuine diff_id.

Format (vbatts/tar-split `tar/storage`, as c/storage writes it; checked against a podman 4.3 store):
gzip of JSON lines, one entry each, in stream order:
- `{"type": 2, "payload": <base64>, "position": N}`: raw bytes of the stream (headers, padding, the
  end-of-archive blocks);
- `{"type": 1, "name": <path>, "name_raw": <base64, if the name is not UTF-8>, "size": N,
  "payload": <base64 crc64 or null>, "position": N}`: a file entry whose `size` content bytes come
  from the file at `name` in the diff dir (entries of size 0, e.g. directories, add nothing).

Anything that does not fit (a missing or changed file, a bad line, a path leaving the diff dir, a
symlink on the way) raises LayerError: the caller then records the layer as unverified.
"""

from __future__ import annotations

import base64
import binascii
import errno
import json
import os
import stat
from collections.abc import Iterator
from typing import Any

from flatmount.errors import LayerError

FILE_TYPE = 1
SEGMENT_TYPE = 2
MAX_LINE = 64 << 20         # one JSON line: a segment is a header (+ PAX records), far smaller
_CHUNK = 1 << 20
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _entries(f: Any, label: str) -> Iterator[tuple[int, bytes, int]]:
    """(type, segment bytes or file name, file size) for each JSON line of a tar-split stream."""
    n = 0
    while True:
        try:
            line = f.readline(MAX_LINE + 1)
        except (OSError, EOFError, ValueError) as e:   # gzip.BadGzipFile is an OSError
            raise LayerError(f"{label}: tar-split data unreadable ({e})") from None
        if not line:
            return
        n += 1
        if len(line) > MAX_LINE:
            raise LayerError(f"{label}: tar-split line {n} is too long")
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise LayerError(f"{label}: tar-split line {n} is not JSON") from None
        if not isinstance(e, dict):
            raise LayerError(f"{label}: tar-split line {n} is not an object")
        kind = e.get("type")
        if kind == SEGMENT_TYPE:
            yield SEGMENT_TYPE, _b64(e.get("payload"), label, n), 0
        elif kind == FILE_TYPE:
            size = e.get("size", 0)
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise LayerError(f"{label}: tar-split line {n}: bad size")
            if e.get("name_raw") is not None:
                name = _b64(e["name_raw"], label, n)
            elif isinstance(e.get("name"), str):
                name = os.fsencode(e["name"])
            else:
                raise LayerError(f"{label}: tar-split line {n}: file entry without a name")
            yield FILE_TYPE, name, size
        else:
            raise LayerError(f"{label}: tar-split line {n}: unknown entry type {kind!r}")


def _b64(v: Any, label: str, n: int) -> bytes:
    if v is None:
        return b""
    if not isinstance(v, str):
        raise LayerError(f"{label}: tar-split line {n}: payload is not base64 text")
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise LayerError(f"{label}: tar-split line {n}: payload is not base64") from None


def open_beneath(dir_fd: int, name: bytes, label: str) -> int:
    """fd of the regular file `name` below the directory `dir_fd`: no component may be `..` or a
    symlink (so the stream can only ever contain bytes from inside the diff dir)."""
    parts = [p for p in name.split(b"/") if p and p != b"."]
    if not parts or b".." in parts:
        raise LayerError(f"{label}: tar-split names {name!r}, outside the layer")
    fd = dir_fd
    try:
        for part in parts[:-1]:
            try:
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC, dir_fd=fd)
            except OSError as e:
                raise LayerError(f"{label}: {name!r}: {_why(e)}") from None
            if fd != dir_fd:
                os.close(fd)
            fd = nfd
        try:   # never open a device or FIFO planted where a file should be: look first
            st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise LayerError(f"{label}: {name!r} in the diff dir is not a regular file")
            ffd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC, dir_fd=fd)
        except OSError as e:
            raise LayerError(f"{label}: {name!r}: {_why(e)}") from None
        fst = os.fstat(ffd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            os.close(ffd)
            raise LayerError(f"{label}: {name!r} in the diff dir changed while it was opened")
        return ffd
    finally:
        if fd != dir_fd:
            os.close(fd)


def _why(e: OSError) -> str:
    if e.errno in (errno.ELOOP, errno.ENOTDIR):
        return "a symlink or not a directory on the way in the diff dir"
    return e.strerror or str(e)


class TarSplitStream:
    """The rebuilt tar stream as a readable binary file (short reads allowed, like a pipe)."""

    def __init__(self, tarsplit: Any, dir_fd: int, label: str):
        self._entries = _entries(tarsplit, label)
        self._dir_fd = dir_fd
        self._label = label
        self._seg = memoryview(b"")
        self._fd = -1
        self._left = 0
        self._eof = False

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _next(self) -> bool:
        """Make a segment or a file current; False at the end of the stream."""
        while not self._seg and self._left == 0:
            if self._fd >= 0:
                self._finish_file()
            if self._eof:
                return False
            try:
                kind, data, size = next(self._entries)
            except StopIteration:
                self._eof = True
                return False
            if kind == SEGMENT_TYPE:
                self._seg = memoryview(data)
            elif size:
                fd = open_beneath(self._dir_fd, data, self._label)
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                    os.close(fd)
                    raise LayerError(f"{self._label}: {data!r} in the diff dir is not the "
                                       f"{size}-byte file the tar-split data describes")
                os.set_blocking(fd, True)
                self._fd, self._left = fd, size
        return True

    def _finish_file(self) -> None:
        os.close(self._fd)
        self._fd = -1

    def readinto(self, b: bytearray | memoryview) -> int:
        mv = memoryview(b).cast("B")
        if not mv or not self._next():
            return 0
        if self._seg:
            n = min(len(mv), len(self._seg))
            mv[:n] = self._seg[:n]
            self._seg = self._seg[n:]
            return n
        want = min(len(mv), self._left)
        n = os.readv(self._fd, [mv[:want]])
        if n <= 0:
            raise LayerError(f"{self._label}: a file in the diff dir is shorter than recorded")
        self._left -= n
        return n

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = _CHUNK
        buf = bytearray(min(n, _CHUNK) if n else 0)
        got = self.readinto(buf)
        return bytes(buf[:got])
