"""A real directory tree -> the tree model (what `mkcomposefs DIR` reads), optionally filling an object store.

Why: plain directories are one of the three layer sources, and `mkimage DIR` must produce the same
image composefs would.  The walk goes by file descriptors (every lookup relative to the already-open
parent directory, with O_NOFOLLOW, and each opened file checked against its lstat), so neither a
symlink inside the tree nor one swapped in while we scan can make us read or store anything outside
it.  Names stay bytes so non-UTF-8 names survive.  At most one descriptor per directory level is open.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING

from flatmount.errors import LayerError
from flatmount.image.tree import INLINE_MAX, Inode

if TYPE_CHECKING:  # pragma: no cover
    from objects.store import ObjectStore

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK | _CLOEXEC
_NO_XATTRS = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA, errno.ENOENT)
_PROC_FD = os.path.isdir("/proc/self/fd")
_READ_WHOLE = 1 << 20          # files up to this size are read in one go and hashed from memory


def scan_directory(path: str | bytes | os.PathLike, objects: ObjectStore | None = None) -> Inode:
    """The tree below `path` (the directory itself is the root; a symlink given as `path` is followed).

    Regular files of at most 64 bytes are inlined; larger ones get their fs-verity digest and, when
    `objects` is given, are stored there (made durable by one `objects.sync()` at the end).
    """
    top = os.fsencode(path)
    try:
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    except NotADirectoryError:
        raise LayerError(f"cannot scan {os.fsdecode(top)!r}: not a directory") from None
    except OSError as e:
        raise LayerError(f"cannot scan {os.fsdecode(top)!r}: {e.strerror}") from None
    scanner = _Scanner(objects)
    stack: list[tuple[int, bytes, Inode, object]] = []
    try:
        root = scanner.directory(fd, os.fstat(fd), top)
        stack.append((fd, top, root, iter(_names(fd, top))))
        while stack:
            dfd, dpath, dnode, names = stack[-1]
            for name in names:
                child_path = dpath + b"/" + name
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue          # removed while we scanned
                except OSError as e:
                    raise _io_error("stat", child_path, e) from None
                if stat.S_ISDIR(st.st_mode):
                    cfd = scanner.open_checked(dfd, name, st, child_path, _DIR_FLAGS)
                    try:
                        child = scanner.directory(cfd, st, child_path)
                        dnode.entries[name] = child
                        stack.append((cfd, child_path, child, iter(_names(cfd, child_path))))
                    except BaseException:
                        os.close(cfd)
                        raise
                    break             # descend first; this directory's iterator resumes afterwards
                dnode.entries[name] = scanner.leaf(dfd, name, st, child_path)
            else:
                os.close(dfd)
                stack.pop()
    finally:
        for dfd, *_ in stack:
            os.close(dfd)
    if objects is not None:
        objects.sync()
    return root


def _names(dfd: int, dpath: bytes) -> list[bytes]:
    try:
        return [os.fsencode(n) for n in os.listdir(dfd)]
    except OSError as e:
        raise _io_error("read directory", dpath, e) from None


def _io_error(what: str, path: bytes, e: OSError) -> LayerError:
    return LayerError(f"cannot {what} {os.fsdecode(path)!r}: {e.strerror}")


class _Scanner:
    __slots__ = ("objects", "links")

    def __init__(self, objects: ObjectStore | None):
        self.objects = objects
        self.links: dict[tuple[int, int], Inode] = {}   # (st_dev, st_ino) -> inode, for nlink > 1

    def open_checked(self, dfd: int, name: bytes, st: os.stat_result, path: bytes, flags: int) -> int:
        """Open `name` below `dfd` without following symlinks; it must still be the inode lstat saw."""
        try:
            fd = os.open(name, flags, dir_fd=dfd)
        except OSError as e:
            raise _io_error("open", path, e) from None
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)
            raise LayerError(f"{os.fsdecode(path)!r} was replaced while being scanned")
        return fd

    def directory(self, fd: int, st: os.stat_result, path: bytes) -> Inode:
        return Inode(st.st_mode, uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns,
                     xattrs=_xattrs(fd, path))

    def leaf(self, dfd: int, name: bytes, st: os.stat_result, path: bytes) -> Inode:
        mode = st.st_mode
        if st.st_nlink > 1:
            known = self.links.get((st.st_dev, st.st_ino))
            if known is not None:
                return known
        if stat.S_ISREG(mode):
            node = self._file(dfd, name, st, path)
        else:
            # no descriptor for symlinks/devices/fifos/sockets: name them through the open parent
            where = (b"/proc/self/fd/%d/" % dfd + name) if _PROC_FD else path
            node = Inode(mode, uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns,
                         xattrs=_xattrs(where, path))
            if stat.S_ISLNK(mode):
                try:
                    node.target = os.readlink(name, dir_fd=dfd)
                except OSError as e:
                    raise _io_error("read symlink", path, e) from None
                node.size = len(node.target)
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                node.rdev = st.st_rdev
        if st.st_nlink > 1:
            self.links[(st.st_dev, st.st_ino)] = node
        return node

    def _file(self, dfd: int, name: bytes, st: os.stat_result, path: bytes) -> Inode:
        fd = self.open_checked(dfd, name, st, path, _FILE_FLAGS)
        with open(fd, "rb") as f:
            node = Inode(st.st_mode, uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns,
                         xattrs=_xattrs(fd, path))
            try:
                size = os.fstat(fd).st_size
                if size <= _READ_WHOLE:        # most files: one read, no streaming machinery
                    data = f.read(max(size, INLINE_MAX) + 1)
                    if len(data) <= size:
                        return self._small(node, data)
                    f.seek(0)                  # it grew under us: stream it
                if self.objects is not None:
                    node.digest = self.objects.put(f)
                else:
                    from objects.digest import digest_stream

                    node.digest = digest_stream(f)
                node.size = os.fstat(fd).st_size
            except OSError as e:
                raise _io_error("read", path, e) from None
        return node


    def _small(self, node: Inode, data: bytes) -> Inode:
        node.size = len(data)
        if len(data) <= INLINE_MAX:
            node.content = data or None
        elif self.objects is not None:
            node.digest = self.objects.put_bytes(data)
        else:
            from objects.digest import fsverity_digest

            node.digest = fsverity_digest(data)
        return node


def _xattrs(where: int | bytes, path: bytes) -> dict[bytes, bytes]:
    """All xattrs of an open file or a path (never of a symlink's target), names and values as bytes."""
    follow = isinstance(where, int)            # follow_symlinks=False is refused together with an fd
    try:
        names = os.listxattr(where, follow_symlinks=follow)
    except OSError as e:
        if e.errno in _NO_XATTRS:
            return {}
        raise _io_error("list xattrs of", path, e) from None
    out: dict[bytes, bytes] = {}
    for name in names:
        try:
            value = os.getxattr(where, name, follow_symlinks=follow)
        except OSError as e:
            if e.errno in _NO_XATTRS:
                continue
            raise _io_error(f"read xattr {name} of", path, e) from None
        out[os.fsencode(name)] = value
    return out
