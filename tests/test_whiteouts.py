"""The one whiteout vocabulary (flatmount.sources.whiteouts), and that every user applies it alike."""

from __future__ import annotations

import io
import tarfile

import pytest

from flatmount.errors import LayerError
from flatmount.image.tree import OPAQUE_XATTR, S_IFCHR, S_IFDIR, S_IFREG, Inode
from flatmount.sources import whiteouts as wh


@pytest.mark.parametrize(("name", "kind", "target"), [
    (b"etc", wh.ENTRY, None),
    (b"a.wh.b", wh.ENTRY, None),
    (b".wh.etc", wh.WHITEOUT, b"etc"),
    (b".wh..wh..opq", wh.OPAQUE, None),
    (b".wh..wh.plnk", wh.AUFS_META, None),
    (b".wh..wh.", wh.AUFS_META, None),
    (b".wh.", wh.INVALID, b""),
    (b".wh..", wh.INVALID, b"."),
    (b".wh...", wh.INVALID, b".."),
    (b".wh....", wh.WHITEOUT, b"..."),
])
def test_classify_name(name, kind, target):
    assert wh.classify_name(name) == (kind, target)
    assert wh.is_whiteout_name(name) == (kind != wh.ENTRY)


def test_whiteout_name_round_trips():
    assert wh.classify_name(wh.whiteout_name(b"x y")) == (wh.WHITEOUT, b"x y")


def test_overlay_forms():
    assert wh.is_whiteout_mode(S_IFCHR, 0) and Inode.whiteout().is_whiteout
    assert not wh.is_whiteout_mode(S_IFCHR | 0o644, (1 << 8) | 3)
    assert not wh.is_whiteout_mode(S_IFREG, 0)
    assert wh.overlay_xattr_name(b"trusted.overlay.opaque") == b"opaque"
    assert wh.overlay_xattr_name(b"user.overlay.whiteout") == b"whiteout"
    assert wh.overlay_xattr_name(b"user.mime") is None
    assert wh.is_opaque_xattrs({OPAQUE_XATTR: b"y"}) and not wh.is_opaque_xattrs({OPAQUE_XATTR: b"x"})


def test_merge_rule_entry_beats_whiteout():
    d, f = Inode(S_IFDIR | 0o755), Inode.file(b"x")
    entries = {b"d": d, b"f": f}
    opaque = wh.merge_whiteouts(entries, {b"d": Inode.whiteout(), b"f": Inode.whiteout(),
                                          b"g": Inode.whiteout()}, opaque_dirs=True)
    assert entries[b"d"] is d and entries[b"f"] is f and entries[b"g"].is_whiteout
    assert opaque == [d]
    entries = {b"d": d}
    assert wh.merge_whiteouts(entries, {b"d": Inode.whiteout()}, opaque_dirs=False) == []
    assert entries == {b"d": d}


def _tar(members: list[tuple[str, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            if data is None:
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_tar_importer_applies_the_rule(tmp_path):
    """A tar layer: a directory beside its own whiteout stands and becomes opaque, a file stands, a
    lone whiteout is a char 0:0 entry; AUFS bookkeeping is refused."""
    from flatmount.sources.layers import read_tar
    from objects import ObjectStore

    objs = ObjectStore(str(tmp_path / "objects"))
    data = _tar([(".wh.d", b""), ("d/", None), ("d/x", b"1"), (".wh.f", b""), ("f", b"2"),
                 (".wh.gone", b""), ("e/", None), ("e/.wh..wh..opq", b"")])
    root = read_tar(io.BytesIO(data), objs).tree
    assert root.entries[b"d"].is_dir and root.entries[b"d"].is_opaque
    assert root.entries[b"f"].content == b"2"
    assert root.entries[b"gone"].is_whiteout
    assert root.entries[b"e"].is_opaque and not root.entries[b"e"].entries
    with pytest.raises(LayerError, match="AUFS"):
        read_tar(io.BytesIO(_tar([(".wh..wh.plnk", b"")])), objs)
    with pytest.raises(LayerError, match="bare"):
        read_tar(io.BytesIO(_tar([("d/.wh.", b"")])), objs)


def test_cstorage_normaliser_applies_the_rule():
    """An overlay upper dir: a directory beside its AUFS whiteout stands (not made opaque: the dir
    says that itself), bookkeeping is dropped, xattr whiteouts become char 0:0."""
    from flatmount.sources.cstorage import normalise_layer_tree

    d = Inode(S_IFDIR | 0o755, entries={})
    xw = Inode(S_IFREG | 0o644, xattrs={b"user.overlay.whiteout": b"y"})
    root = Inode(S_IFDIR | 0o755, entries={b"d": d, b".wh.d": Inode(S_IFREG), b".wh..wh.plnk": Inode(S_IFREG),
                                           b".wh.gone": Inode(S_IFREG), b"xw": xw,
                                           b".wh..wh..opq": Inode(S_IFREG)})
    normalise_layer_tree(root)
    assert set(root.entries) == {b"d", b"gone", b"xw"}
    assert not root.entries[b"d"].is_opaque
    assert root.entries[b"gone"].is_whiteout and root.entries[b"xw"].is_whiteout
    assert root.is_opaque
