"""The one in-memory tree model shared by importers, flatten, the EROFS writer/reader, dump and diff.

A tree is its root `Inode` (a directory).  Directories map entry names (bytes, no `/`, never `.`/`..`)
to child inodes.  A hardlink group is ONE `Inode` object reachable under several names; `nlink` is not
stored, writers count it.

Layer trees use overlayfs' own whiteout vocabulary so every source converges on one form:
- a deleted entry is a character device 0:0 (`is_whiteout`);
- an opaque directory carries the xattr `trusted.overlay.opaque` = `y` (`is_opaque`).
A flattened tree contains neither.

Regular file content is exactly one of: `content` (inline bytes, small files), an external object
(`digest`, the 32-byte fs-verity sha256, and/or `payload`, the path relative to an object dir), or
nothing (size 0).
"""

from __future__ import annotations

import stat
from collections.abc import Iterable, Iterator

from objects.paths import object_path

OPAQUE_XATTR = b"trusted.overlay.opaque"
INLINE_MAX = 64  # composefs inlines regular files of at most this many bytes

# file-type bits of st_mode as plain ints (hot loops use `mode & S_IFMT`); the one definition
S_IFMT = 0o170000
S_IFDIR = stat.S_IFDIR
S_IFREG = stat.S_IFREG
S_IFLNK = stat.S_IFLNK
S_IFCHR = stat.S_IFCHR
S_IFBLK = stat.S_IFBLK
S_IFIFO = stat.S_IFIFO
S_IFSOCK = stat.S_IFSOCK


class Inode:
    """One inode.  Mutable on purpose: importers and flatten build trees in place.

    Construct it as `Inode(mode, uid=..., size=...)`: every field but the mode by keyword, so a call
    site says which field each value is (tests/test_tree.py checks every call in the project).  The
    parameters stay positional-capable only for the tree cache, which rebuilds inodes from marshalled
    rows in this field order (`starmap(Inode, rows)`, its hot loop).
    """

    __slots__ = (
        "mode", "uid", "gid", "mtime_ns", "size", "rdev",
        "xattrs", "target", "content", "digest", "payload", "entries",
    )

    def __init__(
        self,
        mode: int,
        uid: int = 0,
        gid: int = 0,
        mtime_ns: int = 0,
        size: int = 0,
        rdev: int = 0,
        xattrs: dict[bytes, bytes] | None = None,
        target: bytes | None = None,
        content: bytes | None = None,
        digest: bytes | None = None,
        payload: str | None = None,
        entries: dict[bytes, Inode] | None = None,
    ):
        self.mode = mode              # full st_mode: type and permission bits
        self.uid = uid
        self.gid = gid
        self.mtime_ns = mtime_ns      # nanoseconds since the epoch; may be negative
        self.size = size              # regular: content size; symlink: len(target); dir: unused (0)
        self.rdev = rdev              # devices: os.makedev(major, minor)
        self.xattrs = {} if xattrs is None else xattrs   # full names, e.g. b"user.x" -> value
        self.target = target          # symlink target
        self.content = content        # inline content of a small regular file
        self.digest = digest          # fs-verity sha256 of external content (32 bytes)
        self.payload = payload        # object path relative to an object dir; derived from digest if None
        if entries is None and mode & 0o170000 == 0o040000:   # S_IFMT, S_IFDIR (literals: no lookups)
            entries = {}
        self.entries = entries        # directories only: name -> Inode

    # --- constructors -----------------------------------------------------------------------------
    @classmethod
    def directory(cls, mode: int = 0o755, **kw) -> Inode:
        return cls(S_IFDIR | (mode & 0o7777), **kw)

    @classmethod
    def file(cls, data: bytes = b"", mode: int = 0o644, **kw) -> Inode:
        """A regular file with inline content (for small files and tests)."""
        return cls(S_IFREG | (mode & 0o7777), size=len(data), content=data if data else None, **kw)

    @classmethod
    def symlink(cls, target: bytes, mode: int = 0o777, **kw) -> Inode:
        return cls(S_IFLNK | (mode & 0o7777), size=len(target), target=target, **kw)

    @classmethod
    def whiteout(cls, **kw) -> Inode:
        return cls(S_IFCHR, rdev=0, **kw)

    # --- predicates -------------------------------------------------------------------------------
    @property
    def ftype(self) -> int:
        return self.mode & S_IFMT

    @property
    def is_dir(self) -> bool:
        return self.mode & S_IFMT == S_IFDIR

    @property
    def is_reg(self) -> bool:
        return self.mode & S_IFMT == S_IFREG

    @property
    def is_symlink(self) -> bool:
        return self.mode & S_IFMT == S_IFLNK

    @property
    def is_whiteout(self) -> bool:
        return self.mode & S_IFMT == S_IFCHR and self.rdev == 0

    @property
    def is_opaque(self) -> bool:
        return self.xattrs.get(OPAQUE_XATTR) == b"y"

    @property
    def is_external(self) -> bool:
        """A regular file whose content lives in an object directory."""
        return self.content is None and (self.digest is not None or self.payload is not None)

    @property
    def object_path(self) -> str | None:
        """Path of the backing object relative to an object dir (`XX/<62 hex>`), if any."""
        if self.payload is not None:
            return self.payload
        if self.digest is not None:
            return object_path(self.digest)
        return None

    # --- comparison (structure and attributes; hardlink identity is checked by dump comparison) ---
    def attrs(self) -> tuple:
        """Everything but children, as a comparable tuple."""
        return (self.mode, self.uid, self.gid, self.mtime_ns, 0 if self.is_dir else self.size,
                self.rdev, sorted(self.xattrs.items()), self.target, self.content, self.digest,
                self.object_path if self.is_external else None)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Inode):
            return NotImplemented
        stack = [(self, other)]  # iterative: trees may nest thousands deep
        while stack:
            a, b = stack.pop()
            if a is b:
                continue
            if a.attrs() != b.attrs():
                return False
            if a.entries is None or b.entries is None:
                if a.entries is not b.entries:
                    return False
                continue
            if a.entries.keys() != b.entries.keys():
                return False
            stack.extend((child, b.entries[name]) for name, child in a.entries.items())
        return True

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        kind = stat.filemode(self.mode)
        extra = f" {len(self.entries)} entries" if self.entries is not None else f" size={self.size}"
        return f"<Inode {kind} {self.uid}:{self.gid}{extra}>"

    # --- copying ----------------------------------------------------------------------------------
    def copy(self) -> Inode:
        """A shallow copy: same children dict contents, new dict (so entries can be edited)."""
        return Inode(self.mode, uid=self.uid, gid=self.gid, mtime_ns=self.mtime_ns, size=self.size,
                     rdev=self.rdev, xattrs=dict(self.xattrs), target=self.target, content=self.content,
                     digest=self.digest, payload=self.payload,
                     entries=dict(self.entries) if self.entries is not None else None)


def split_path(path: bytes | str) -> list[bytes]:
    """`/a/b/` -> [b"a", b"b"]; rejects `.`/`..` components."""
    if isinstance(path, str):
        path = path.encode("utf-8", "surrogateescape")
    parts = [p for p in path.split(b"/") if p]
    for p in parts:
        if p in (b".", b".."):
            raise ValueError(f"path component {p!r} not allowed in {path!r}")
    return parts


def lookup(root: Inode, path: bytes | str) -> Inode | None:
    """The inode at `path` below `root`, or None."""
    return lookup_parts(root, split_path(path))


def lookup_parts(root: Inode, parts: Iterable[bytes]) -> Inode | None:
    """The inode at the path of names `parts` below `root`, or None (a missing name, or a name
    below a non-directory).  The one tree lookup: every path lookup in a tree goes through here."""
    node = root
    for name in parts:
        entries = node.entries
        if entries is None:
            return None
        node = entries.get(name)
        if node is None:
            return None
    return node


def walk(root: Inode, prefix: bytes = b"") -> Iterator[tuple[bytes, Inode]]:
    """(path, inode) depth-first in byte order, root first as b"/"; hardlinks appear at every name.

    Iterative (a stack of sorted name lists), so any depth walks without recursion.
    """
    yield (prefix or b"/"), root
    if not root.entries:
        return
    stack = [(prefix, root.entries, iter(sorted(root.entries)))]
    while stack:
        base, entries, names = stack[-1]
        for name in names:
            child = entries[name]
            path = base + b"/" + name
            yield path, child
            if child.entries:
                stack.append((path, child.entries, iter(sorted(child.entries))))
                break
        else:
            stack.pop()


def inodes(root: Inode) -> Iterator[Inode]:
    """Every distinct inode of the tree once (a hardlink group once), in no particular order."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        if node.entries:
            stack.extend(node.entries.values())


def count_inodes(root: Inode) -> int:
    """Distinct inodes in the tree (hardlinks counted once)."""
    return sum(1 for _ in inodes(root))
