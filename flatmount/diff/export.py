"""The OCI layer tar that turns one flat tree into another (`diff -o`), planned from the changes
(flatmount.diff.changes) and streamed from the object dirs: deterministic bytes for the same trees."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from flatmount.diff.changes import _NS, DiffStats, _walk_changes, compare_inodes
from flatmount.diff.index import Side, _side, _side_lookup, _side_walk
from flatmount.errors import FlatmountError, ObjectNotFoundError, VerityError
from flatmount.image.diffindex import path_key as _path_key
from flatmount.image.tree import S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, Inode
from flatmount.sources.whiteouts import OPAQUE_WHITEOUT, whiteout_name


@dataclass(frozen=True)
class LayerExport:
    """What `export_layer` wrote."""

    entries: int                 # tar members, whiteouts and opaque markers included
    whiteouts: int               # `.wh.<name>` members
    opaque_dirs: int             # `.wh..wh..opq` members
    skipped_sockets: tuple[bytes, ...]   # sockets cannot be stored in a tar (c/storage skips them too)
    diff_id: str                 # sha256:<hex> of the uncompressed tar (the OCI diff_id)
    digest: str                  # sha256:<hex> of the bytes written (the OCI layer digest)
    size: int                    # bytes written
    compression: str | None


COMPRESSIONS = (None, "gzip", "zstd")


def export_layer(a: Inode | Side, b: Inode | Side, out: str | os.PathLike | IO[bytes],
                 object_dirs: Sequence[str], compression: str | None = None) -> LayerExport:
    """Write an OCI layer tar that turns flat tree `a` into flat tree `b` when applied on top of it.

    `a`/`b`: trees, or their `TreeIndex`/`ImageIndex`.  Members (depth first, names in byte order, so
    the same trees always give the same bytes): every new or changed entry of `b` with its `b`
    attributes, every parent directory of those, a `.wh.<name>` (mode 0, size 0) per deleted entry,
    and `.wh..wh..opq` in a directory of both trees when re-sending all of its `b` content is smaller
    than listing its deletions (a replaced directory).  The root (`./`) only when its attributes changed.
    Regular-file content comes from the inline bytes or from `XX/<62 hex>` in the first of
    `object_dirs` that has it (ObjectNotFoundError otherwise).  Hardlinks: every name of a `b` inode
    that is written is written, the first as a file, the others as tar hardlinks to it.  Xattrs and
    sub-second mtimes go into PAX records (`SCHILY.xattr.<name>`, `mtime`); uname/gname are empty;
    gzip has mtime 0 and no file name.  `out` is a binary file object or a path (written atomically).
    """
    if compression not in COMPRESSIONS:
        raise FlatmountError(f"unknown compression {compression!r} (choose gzip, zstd or none)")
    plan = _plan_layer(_side(a), _side(b))
    if isinstance(out, str | os.PathLike):
        return _write_atomically(os.fspath(out), lambda f: _write_layer(plan, f, object_dirs, compression))
    return _write_layer(plan, out, object_dirs, compression)


@dataclass
class _Plan:
    members: list[tuple[bytes, str, Inode | None, Any]] = field(default_factory=list)
    whiteouts: int = 0                             # (path, 'entry'|'whiteout'|'opaque', inode, link key)
    opaque: int = 0


def _plan_layer(sa: Side, sb: Side) -> _Plan:
    """Which paths go into the layer and how."""
    raw = _walk_changes(sa, sb, True, DiffStats())
    emit: dict[bytes, Inode] = {}
    deleted: list[bytes] = []
    for p, r in raw.items():
        if r.kind == "D":
            deleted.append(p)
        else:
            emit[p] = r.b if r.b is not None else _side_lookup(sb, p)[0]
    _close_links(emit, sb)
    opaque = _choose_opaque(sa, sb, emit, deleted)
    if opaque:
        deleted = [p for p in deleted if not any(p.startswith(o + b"/") for o in opaque)]
        _close_links(emit, sb)
    for p in [*emit, *deleted]:                    # parents of everything written, `b` attributes
        q = p[:p.rindex(b"/")]
        while q and q not in emit:
            emit[q] = _side_lookup(sb, q)[0]
            q = q[:q.rindex(b"/")]
    members: list[tuple[bytes, str, Inode | None, Any]] = [
        (p, "entry", n, sb._links(n) or id(n)) for p, n in emit.items()]
    root_a, root_b = sa._root()[0], sb._root()[0]
    if compare_inodes(root_a, root_b, True):
        members.append((b"", "entry", root_b, None))
    for p in deleted:
        i = p.rindex(b"/") + 1
        members.append((p[:i] + whiteout_name(p[i:]), "whiteout", None, None))
    members += [(o + b"/" + OPAQUE_WHITEOUT, "opaque", None, None) for o in opaque]
    members.sort(key=lambda m: _path_key(m[0]))
    return _Plan(members, len(deleted), len(opaque))


def _ancestors(p: bytes) -> Iterator[bytes]:
    """`/a/b/c` -> `/a/b`, `/a`, `` (the root)."""
    while p:
        p = p[:p.rindex(b"/")]
        yield p


def _choose_opaque(sa: Side, sb: Side, emit: dict[bytes, Inode], deleted: list[bytes]) -> list[bytes]:
    """Directories (in both trees, never the root) to write whole with `.wh..wh..opq`, deepest first:
    one is chosen when its whole `b` subtree plus the marker is fewer members than what would be
    written below it otherwise (entries, whiteouts and the markers of deeper choices), so a replaced
    directory becomes opaque and ties keep the smaller scope.  Adds the chosen subtrees to `emit`."""
    cost: dict[bytes, int] = {}                    # members that would be written below each directory
    for p in [*emit, *deleted]:
        for q in _ancestors(p):
            cost[q] = cost.get(q, 0) + 1
    candidates = {q for p in deleted for q in _ancestors(p) if q}
    dels = set(deleted)
    chosen: list[bytes] = []
    for d in sorted(candidates, key=lambda q: (-q.count(b"/"), _path_key(q))):
        fa, fb = _side_lookup(sa, d), _side_lookup(sb, d)
        if fa is None or fb is None or fa[1] is None or fb[1] is None:
            continue                               # not a directory on both sides
        current = cost[d]
        if _count_below(sb, d, fb[1], current) + 1 >= current:
            continue
        prefix = d + b"/"
        size = 0
        for p, n, _h in _side_walk(sb, d, fb[1]):
            emit.setdefault(p, n)
            size += 1
        dels.difference_update([p for p in dels if p.startswith(prefix)])
        chosen = [o for o in chosen if not o.startswith(prefix)] + [d]
        delta = size + 1 - current                 # the subtree and the marker replace the rest
        for q in (d, *_ancestors(d)):
            cost[q] += delta
    return chosen


def _count_below(side: Side, path: bytes, handle: Any, limit: int) -> int:
    """Entries below a directory; counting stops once `limit` is reached."""
    n = 0
    for _ in _side_walk(side, path, handle):
        n += 1
        if n >= limit:
            break
    return n


def _close_links(emit: dict[bytes, Inode], sb: Side) -> None:
    """A hardlink group is written whole: a tar hardlink can only point into the same layer."""
    for n in list(emit.values()):
        for p in sb._links(n) or ():
            if p not in emit:
                emit[p] = _side_lookup(sb, p)[0]


def _pax_time(ns: int) -> str:
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    sec, frac = divmod(ns, _NS)
    return f"{sign}{sec}.{frac:09d}" if frac else f"{sign}{sec}"


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _tarinfo(path: bytes, n: Inode) -> tarfile.TarInfo:
    name = "./" if not path else _text(path[1:])
    ti = tarfile.TarInfo(name + "/" if n.is_dir and path else name)
    ti.mode = n.mode & 0o7777
    ti.uid, ti.gid = n.uid, n.gid
    ti.uname = ti.gname = ""
    ti.mtime = n.mtime_ns // _NS
    pax: dict[str, str] = {}
    if n.mtime_ns % _NS or n.mtime_ns < 0:
        pax["mtime"] = _pax_time(n.mtime_ns)
    for k, v in sorted(n.xattrs.items()):
        pax["SCHILY.xattr." + _text(k)] = _text(v)
    ti.pax_headers = pax
    fmt = n.mode & S_IFMT
    if fmt == S_IFDIR:
        ti.type = tarfile.DIRTYPE
    elif fmt == S_IFREG:
        ti.type = tarfile.REGTYPE
        ti.size = n.size
    elif fmt == S_IFLNK:
        ti.type = tarfile.SYMTYPE
        ti.linkname = _text(n.target or b"")
    elif fmt == stat.S_IFCHR or fmt == stat.S_IFBLK:
        ti.type = tarfile.CHRTYPE if fmt == stat.S_IFCHR else tarfile.BLKTYPE
        ti.devmajor, ti.devminor = os.major(n.rdev), os.minor(n.rdev)
    elif fmt == stat.S_IFIFO:
        ti.type = tarfile.FIFOTYPE
    else:
        raise FlatmountError(f"{os.fsdecode(path)}: file type {oct(fmt)} cannot be stored in a tar")
    return ti


def _whiteout_info(path: bytes) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(_text(path[1:]))
    ti.mode = 0
    ti.uname = ti.gname = ""
    return ti


def _safe_objpath(objpath: str, path: bytes) -> str:
    parts = objpath.split("/")
    if objpath.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise FlatmountError(f"{os.fsdecode(path)}: object path {objpath!r} is not below an object dir")
    return objpath


def _open_object(n: Inode, path: bytes, object_dirs: Sequence[str]) -> IO[bytes]:
    objpath = _safe_objpath(n.object_path, path)
    for d in object_dirs:
        try:
            f = open(os.path.join(d, objpath), "rb")
        except (FileNotFoundError, NotADirectoryError):
            continue
        size = os.fstat(f.fileno()).st_size
        if size != n.size:
            f.close()
            raise VerityError(f"object {objpath} in {d} has {size} bytes, {os.fsdecode(path)} needs {n.size}")
        return f
    raise ObjectNotFoundError(f"object {objpath} (content of {os.fsdecode(path)}) is in none of the "
                              f"object dirs: {', '.join(object_dirs) or '(none given)'}")


class _Hashing(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to `f`."""

    def __init__(self, f: IO[bytes]):
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.f.write(b)
        n = len(b)
        self.size += n
        return n


def _write_layer(plan: _Plan, out: IO[bytes], object_dirs: Sequence[str],
                 compression: str | None) -> LayerExport:
    outer = _Hashing(out)
    if compression is None:
        inner, closer = outer, None
    elif compression == "gzip":
        import gzip

        closer = gzip.GzipFile(filename="", mode="wb", fileobj=outer, mtime=0, compresslevel=6)
        inner = _Hashing(closer)
    else:
        import zstandard

        closer = zstandard.ZstdCompressor(level=3).stream_writer(outer, closefd=False)
        inner = _Hashing(closer)
    first_name: dict[Any, str] = {}               # hardlink group -> name written first
    sockets: list[bytes] = []
    tf = tarfile.open(fileobj=inner, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape")
    from flatmount.progress import step

    for i, (path, kind, n, link_key) in enumerate(plan.members):
        step("diff: writing the layer", i, len(plan.members))
        if kind != "entry":
            tf.addfile(_whiteout_info(path))
            continue
        if n.mode & S_IFMT == stat.S_IFSOCK:
            sockets.append(path)
            continue
        ti = _tarinfo(path, n)
        if ti.type == tarfile.REGTYPE:
            if link_key in first_name:        # a later name of a hardlink group already written
                ti.type, ti.size, ti.linkname = tarfile.LNKTYPE, 0, first_name[link_key]
                tf.addfile(ti)
                continue
            first_name[link_key] = ti.name
            if n.size == 0:
                tf.addfile(ti)
            elif n.content is not None:
                if len(n.content) != n.size:
                    raise FlatmountError(f"{os.fsdecode(path)}: inline content has {len(n.content)} "
                                         f"bytes, size says {n.size}")
                tf.addfile(ti, io.BytesIO(n.content))
            elif n.object_path is None:
                raise FlatmountError(f"{os.fsdecode(path)}: {n.size} bytes but neither content nor object")
            else:
                with _open_object(n, path, object_dirs) as f:
                    tf.addfile(ti, f)
        else:
            tf.addfile(ti)
    tf.close()
    diff_id = "sha256:" + inner.sha.hexdigest()
    if closer is not None:
        closer.close()
    return LayerExport(len(plan.members) - len(sockets), plan.whiteouts, plan.opaque, tuple(sockets),
                       diff_id, "sha256:" + outer.sha.hexdigest(), outer.size, compression)


def _write_atomically(path: str, write) -> Any:
    """Write through `write(f)` into a temp file next to `path`, fsync, rename into place."""
    from flatmount.atomic import AtomicFile
    from flatmount.errors import FlatmountError
    from flatmount.safepath import check_output

    check_output(path)  # a new or regular file only: never through a symlink, never a device
    try:
        with AtomicFile(os.path.dirname(os.path.abspath(path)), prefix=f".{os.path.basename(path)}.") as af:
            result = write(af.file)
            af.commit(path)
    except FlatmountError:
        raise
    except OSError as e:  # a missing or read-only directory, a full disk: say which file
        raise FlatmountError(f"cannot write {path}: {e.strerror or e}") from None
    return result
