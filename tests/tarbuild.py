"""Test helper: layer tarballs written with Python's tarfile, the tree each should import to, OCI layouts.

`Tar` records every entry twice: into a tarfile and into an expected layer tree built by hand with
the rules of flatmount.sources.layers (so a test compares the importer against an independent statement of
what the tar means).  `make_oci` writes an OCI image layout from layer tars, with knobs to break it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import tarfile
import zlib
from pathlib import Path

from flatmount.image.tree import (
    OPAQUE_XATTR,
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFIFO,
    S_IFLNK,
    S_IFREG,
    Inode,
    lookup_parts,
)
from flatmount.store import reftable
from objects.digest import fsverity_digest

NS = 1_000_000_000


class Tar:
    """An in-memory tar plus the layer tree it should import to (`expected`)."""

    def __init__(self, fmt: int = tarfile.PAX_FORMAT, root: bool = True, root_mtime: int = 100):
        self.buf = io.BytesIO()
        self.tf = tarfile.open(fileobj=self.buf, mode="w", format=fmt, encoding="utf-8",
                               errors="surrogateescape")
        self.expected = Inode(S_IFDIR | 0o755)
        self.blobs: dict[bytes, bytes] = {}
        self._opaque: list[Inode] = []
        self._whiteouts: list[tuple[Inode, bytes]] = []
        if root:
            self.dir("./", mtime=root_mtime)

    # --- expected-tree bookkeeping ------------------------------------------------------------------
    def _place(self, name: str, node: Inode, mtime_ns: int) -> None:
        parts = [p for p in name.encode("utf-8", "surrogateescape").split(b"/") if p and p != b"."]
        if not parts:
            r = self.expected
            r.mode, r.uid, r.gid, r.mtime_ns, r.xattrs = node.mode, node.uid, node.gid, node.mtime_ns, node.xattrs
            return
        d = self.expected
        for p in parts[:-1]:
            child = d.entries.get(p)
            if child is None:
                child = d.entries[p] = Inode(S_IFDIR | 0o755, mtime_ns=mtime_ns)
            d = child
        old = d.entries.get(parts[-1])
        if old is not None and old.is_dir and node.is_dir:  # explicit dir after implicit one
            old.mode, old.uid, old.gid, old.mtime_ns, old.xattrs = node.mode, node.uid, node.gid, node.mtime_ns, node.xattrs
            return
        d.entries[parts[-1]] = node

    def _info(self, name: str, type_: bytes, mode: int, mtime: int | float, uid: int, gid: int,
              pax: dict | None) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.mtime, ti.uid, ti.gid = type_, mode, int(mtime), uid, gid
        ti.uname = ti.gname = ""
        if pax:
            ti.pax_headers = dict(pax)
        return ti

    @staticmethod
    def _mtime_ns(mtime: int, pax: dict | None) -> int:
        if pax and "mtime" in pax:
            sec, _, frac = pax["mtime"].partition(".")
            return int(sec) * NS + int((frac + "0" * 9)[:9])
        return mtime * NS

    @staticmethod
    def _xattrs(xattrs: dict | None) -> tuple[dict, dict]:
        pax, exp = {}, {}
        for k, v in (xattrs or {}).items():
            kb = k.encode() if isinstance(k, str) else k
            vb = v.encode() if isinstance(v, str) else v
            pax["SCHILY.xattr." + kb.decode("utf-8", "surrogateescape")] = vb.decode("utf-8", "surrogateescape")
            exp[kb] = vb
        return pax, exp

    # --- entries ------------------------------------------------------------------------------------
    def dir(self, name: str, mode: int = 0o755, mtime: int = 100, uid: int = 0, gid: int = 0,
            xattrs: dict | None = None, pax: dict | None = None) -> None:
        xp, xe = self._xattrs(xattrs)
        pax = {**xp, **(pax or {})}
        self.tf.addfile(self._info(name, tarfile.DIRTYPE, mode, mtime, uid, gid, pax))
        mt = self._mtime_ns(mtime, pax)
        self._place(name, Inode(S_IFDIR | mode, uid=uid, gid=gid, mtime_ns=mt, xattrs=xe), mt)

    def file(self, name: str, data: bytes, mode: int = 0o644, mtime: int = 100, uid: int = 0, gid: int = 0,
             xattrs: dict | None = None, pax: dict | None = None) -> Inode:
        xp, xe = self._xattrs(xattrs)
        pax = {**xp, **(pax or {})}
        ti = self._info(name, tarfile.REGTYPE, mode, mtime, uid, gid, pax)
        ti.size = len(data)
        self.tf.addfile(ti, io.BytesIO(data))
        mt = self._mtime_ns(mtime, pax)
        if len(data) > 64:
            d = fsverity_digest(data)
            self.blobs[d] = data
            node = Inode(S_IFREG | mode, uid=uid, gid=gid, mtime_ns=mt, size=len(data), digest=d, xattrs=xe)
        else:
            node = Inode(S_IFREG | mode, uid=uid, gid=gid, mtime_ns=mt, size=len(data), content=data or None,
                         xattrs=xe)
        self._place(name, node, mt)
        return node

    def symlink(self, name: str, target: str, mtime: int = 100, uid: int = 0, gid: int = 0) -> None:
        ti = self._info(name, tarfile.SYMTYPE, 0o777, mtime, uid, gid, None)
        ti.linkname = target
        self.tf.addfile(ti)
        t = target.encode("utf-8", "surrogateescape")
        self._place(name, Inode(S_IFLNK | 0o777, uid=uid, gid=gid, mtime_ns=mtime * NS, size=len(t), target=t),
                    mtime * NS)

    def hardlink(self, name: str, target: str, mtime: int = 100) -> None:
        ti = self._info(name, tarfile.LNKTYPE, 0o644, mtime, 0, 0, None)
        ti.linkname = target
        self.tf.addfile(ti)
        node = lookup_parts(self.expected, [p for p in target.encode().split(b"/") if p and p != b"."])
        assert node is not None, f"hardlink target {target!r} not in the tar"
        self._place(name, node, mtime * NS)

    def device(self, name: str, kind: str, major: int, minor: int, mode: int = 0o660, mtime: int = 100) -> None:
        ti = self._info(name, tarfile.CHRTYPE if kind == "c" else tarfile.BLKTYPE, mode, mtime, 0, 0, None)
        ti.devmajor, ti.devminor = major, minor
        self.tf.addfile(ti)
        ftype = S_IFCHR if kind == "c" else S_IFBLK
        node = Inode(ftype | mode, mtime_ns=mtime * NS, rdev=os.makedev(major, minor))
        if node.is_whiteout:
            node = Inode.whiteout()
        self._place(name, node, mtime * NS)

    def fifo(self, name: str, mode: int = 0o644, mtime: int = 100) -> None:
        self.tf.addfile(self._info(name, tarfile.FIFOTYPE, mode, mtime, 0, 0, None))
        self._place(name, Inode(S_IFIFO | mode, mtime_ns=mtime * NS), mtime * NS)

    def whiteout(self, name: str, mtime: int = 100) -> None:
        """`.wh.<x>` entry (written as given); expected: whiteout <x>, or opaque dir for .wh..wh..opq."""
        self.tf.addfile(self._info(name, tarfile.REGTYPE, 0o644, mtime, 0, 0, None), io.BytesIO(b""))
        head, _, base = name.rstrip("/").rpartition("/")
        assert base.startswith(".wh.")
        d = self.expected
        for p in head.encode().split(b"/"):
            if p and p != b".":
                child = d.entries.get(p)
                if child is None:
                    child = d.entries[p] = Inode(S_IFDIR | 0o755, mtime_ns=mtime * NS)
                d = child
        if base == ".wh..wh..opq":
            self._opaque.append(d)
        else:
            self._whiteouts.append((d, base[4:].encode()))

    def raw(self, ti: tarfile.TarInfo, data: bytes | None = None) -> None:
        """An entry with no expectation (for bad-input tests)."""
        if data is not None:
            ti.size = len(data)
        self.tf.addfile(ti, io.BytesIO(data) if data is not None else None)

    def bytes(self) -> bytes:
        self.tf.close()
        return self.buf.getvalue()

    def tree(self) -> Inode:
        """The expected layer tree (whiteouts and opaque markers applied as flatmount.sources.layers does)."""
        for d, n in self._whiteouts:
            if n in d.entries:
                if d.entries[n].is_dir:
                    self._opaque.append(d.entries[n])
            else:
                d.entries[n] = Inode.whiteout()
        self._whiteouts = []
        for d in self._opaque:
            d.xattrs[OPAQUE_XATTR] = b"y"
        self._opaque = []
        return self.expected


def compress(data: bytes, kind: str) -> bytes:
    if kind == "gzip":
        c = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        return c.compress(data) + c.flush()
    if kind == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)
    assert kind == "none"
    return data


MEDIA = {"none": "application/vnd.oci.image.layer.v1.tar",
         "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
         "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}


def make_oci(path: str | os.PathLike, layers: list[tuple[bytes, str]], tag: str | None = "t", *,
             media_types: dict[int, str] | None = None, diff_ids: dict[int, str] | None = None,
             sizes: dict[int, int] | None = None, blob_override: dict[int, bytes] | None = None,
             extra_manifests: int = 0) -> dict:
    """An OCI layout with these (uncompressed tar, compression) layers; overrides break it on purpose."""
    path = Path(path)
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        h = hashlib.sha256(data).hexdigest()
        (blobs / h).write_bytes(data)
        return "sha256:" + h

    descs, dids = [], []
    for i, (tar, kind) in enumerate(layers):
        blob = compress(tar, kind)
        digest = put(blob)
        if blob_override and i in blob_override:
            (blobs / digest.split(":")[1]).write_bytes(blob_override[i])
        descs.append({"mediaType": (media_types or {}).get(i, MEDIA[kind]), "digest": digest,
                      "size": (sizes or {}).get(i, len(blob))})
        dids.append((diff_ids or {}).get(i, "sha256:" + hashlib.sha256(tar).hexdigest()))
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": dids}}).encode()
    cdesc = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(config),
             "size": len(config)}
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": cdesc, "layers": descs}).encode()
    mdesc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(manifest),
             "size": len(manifest)}
    if tag is not None:
        mdesc["annotations"] = {"org.opencontainers.image.ref.name": tag}
    manifests = [mdesc]
    for k in range(extra_manifests):
        manifests.append({**mdesc, "annotations": {"org.opencontainers.image.ref.name": f"extra{k}"}})
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": manifests}))
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return {"config": cdesc["digest"], "manifest": mdesc["digest"], "layers": descs, "diff_ids": dids,
            "path": str(path)}


# --- store inspection -----------------------------------------------------------------------------

TABLES = ("layers", "images", "names", "flat_images", "refs", "leases")


def db_rows(root: str | os.PathLike) -> dict[str, list]:
    db = Path(root) / "flatmount.db"
    if not db.exists():
        return {}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        present = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        # a store killed before its schema committed has a DB file without tables: that is "no rows"
        out = {t: sorted(con.execute(f"SELECT * FROM {t}").fetchall(), key=repr) if t in present else []
               for t in TABLES}
        if "refs" in present:  # as (owner, object path), whichever layout the store has
            out["refs"] = sorted(reftable.rows(con))
        return out
    finally:
        con.close()


def store_state(root: str | os.PathLike) -> dict:
    """Every file (size + sha256) and directory below a store, except the SQLite files, plus DB rows."""
    root = Path(root)
    files = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            files[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            rel = os.path.relpath(p, root)
            if rel.startswith("flatmount.db"):
                continue
            with open(p, "rb") as fh:
                files[rel] = hashlib.sha256(fh.read()).hexdigest()
    return {"files": files, "rows": db_rows(root)}


def check_consistent(root: str | os.PathLike) -> None:
    """No record without its files: every layer has its image, every ref its object, names an image."""
    root = Path(root)
    rows = db_rows(root)
    if not rows:
        return
    layer_ids = {r[0] for r in rows["layers"]}
    for r in rows["layers"]:
        assert (root / "layers" / f"{r[0]}.erofs").is_file(), f"layer {r[0]} has no image file"
        assert r[1] is None or r[1] in layer_ids, f"layer {r[0]} has an unknown parent"
    for owner, obj in rows["refs"]:
        assert (root / "objects" / obj).is_file(), f"{owner} references missing object {obj}"
        if owner.startswith("layer:"):
            assert owner[6:] in layer_ids
    image_ids = {r[0] for r in rows["images"]}
    for r in rows["images"]:
        assert r[1] is None or r[1] in layer_ids, f"image {r[0]} has an unknown top layer"
    for name, image_id in rows["names"]:
        assert image_id in image_ids, f"name {name} points at unknown image"


# --- bad layer tarballs: (id, bytes, message regex) -----------------------------------------------

def _ti(name: str, type_: bytes = tarfile.REGTYPE, **kw) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def _tar(*entries: tuple[tarfile.TarInfo, bytes | None], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    t = Tar(fmt=fmt)
    for ti, data in entries:
        t.raw(ti, data)
    return t.bytes()


def _good() -> bytes:
    t = Tar()
    t.file("etc/big", b"x" * 5000)
    t.file("etc/small", b"small")
    t.file("etc/other", b"y" * 3000)
    return t.bytes()


def _corrupt_second_header() -> bytes:
    data = bytearray(_good())
    # entries: ./ (1 block), etc/ implicit? no: ./, etc/big header at 512, data 5000 -> 10 blocks
    off = 512 + 512 + 10 * 512  # header of etc/small
    data[off + 10] ^= 0xFF      # name byte: checksum no longer matches
    return bytes(data)


def _end_offset(tar: bytes) -> int:
    """Offset of the end-of-archive blocks."""
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        last = tf.getmembers()[-1]
    return last.offset_data + ((last.size + 511) // 512) * 512


def bad_tars() -> list[tuple[str, bytes, str]]:
    good = _good()
    gz = compress(good, "gzip")
    zs = compress(good, "zstd")
    end = _end_offset(good)
    cases = [
        ("dotdot", _tar((_ti("../evil"), b"x")), r"'\.\.' in entry name"),
        ("dotdot-inner", _tar((_ti("a/../../b"), b"x")), r"'\.\.' in entry name"),
        ("below-symlink", _tar((_ti("l", tarfile.SYMTYPE, linkname="/etc"), None), (_ti("l/passwd"), b"x")),
         "below a symlink"),
        ("below-file", _tar((_ti("f"), b"x"), (_ti("f/x"), b"y")), "parent is not a directory"),
        ("duplicate-file", _tar((_ti("a"), b"x"), (_ti("a"), b"y")), "duplicate entry"),
        ("duplicate-dir", _tar((_ti("d", tarfile.DIRTYPE), None), (_ti("d", tarfile.DIRTYPE), None)),
         "duplicate entry"),
        ("duplicate-root", _tar((_ti(".", tarfile.DIRTYPE), None)), "duplicate entry for the root"),
        ("file-over-dir", _tar((_ti("a/b"), b"x"), (_ti("a"), b"y")), "earlier entries are below it"),
        ("duplicate-whiteout", _tar((_ti(".wh.a"), b""), (_ti(".wh.a"), b"")), "duplicate whiteout"),
        ("duplicate-opaque", _tar((_ti("d/.wh..wh..opq"), b""), (_ti("d/.wh..wh..opq"), b"")),
         "duplicate opaque"),
        ("whiteout-dir", _tar((_ti(".wh.x", tarfile.DIRTYPE), None)), "directory cannot be a whiteout"),
        ("bare-whiteout", _tar((_ti("d/.wh."), b"")), "bare '.wh.'"),
        ("whiteout-root", _tar((_ti(".wh.."), b"")), "whiteout of / is not allowed"),
        ("whiteout-dotdot", _tar((_ti("d/.wh..."), b"")), r"whiteout of \.\. is not allowed"),
        ("aufs-meta", _tar((_ti(".wh..wh.plnk"), b"")), "AUFS"),
        ("nul-name", _tar((_ti("a", pax_headers={"path": "a\x00b"}), b"x")), "NUL"),
        ("long-component", _tar((_ti("d/" + "n" * 256), b"x")), "longer than 255"),
        ("hardlink-missing", _tar((_ti("h", tarfile.LNKTYPE, linkname="nothere"), None)),
         "missing or outside this layer"),
        ("hardlink-outside", _tar((_ti("h", tarfile.LNKTYPE, linkname="../etc/passwd"), None)),
         r"'\.\.' in entry name"),
        ("hardlink-dir", _tar((_ti("d", tarfile.DIRTYPE), None), (_ti("h", tarfile.LNKTYPE, linkname="d"), None)),
         "is a directory"),
        ("hardlink-forward", _tar((_ti("h", tarfile.LNKTYPE, linkname="f"), None), (_ti("f"), b"x")),
         "missing or outside"),
        ("root-not-dir", _tar((_ti("./"), b"x")), "root must be a directory"),
        ("empty-symlink", _tar((_ti("l", tarfile.SYMTYPE, linkname=""), None)), "empty"),
        ("unknown-type", _tar((_ti("v", b"V"), None)), "unsupported tar entry type"),
        ("truncated-in-data", good[:700], "archive ends inside this file|truncated"),
        ("truncated-at-header", good[:end], "truncated"),
        ("truncated-in-header", good[:end - 5000 - 100], "truncated|ends inside"),
        ("corrupt-header", _corrupt_second_header(), "corrupt"),
        ("empty", b"", "empty input"),
        ("garbage", b"not a tar archive at all" * 40, "not a tar archive"),
        ("bzip2", b"BZh91AY&SY" + b"\0" * 100, "bzip2/xz"),
        ("gzip-truncated", gz[: len(gz) // 2], "gzip stream is truncated|truncated|ends inside"),
        ("gzip-corrupt", gz[:30] + bytes(b ^ 0x55 for b in gz[30:60]) + gz[60:], "corrupt|truncated"),
        ("gzip-trailing-garbage", gz + b"garbage!", "corrupt gzip"),
        ("zstd-truncated", zs[: len(zs) // 2], "truncated|ends inside"),
        ("zstd-trailing-garbage", zs + b"garbage!", "corrupt zstd"),
    ]
    return cases
