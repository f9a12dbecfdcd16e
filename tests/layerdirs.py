"""Test/bench helper: write layer trees as plain directories in overlayfs' own form and mount them.

The kernel overlay of such directories is the independent reference for flatten: whiteouts become
char 0:0 devices (os.mknod), opaque dirs keep `trusted.overlay.opaque=y`, hardlinks (one Inode
under several names) become real hardlinks.  External file content is looked up by digest in `blobs`.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Mapping, Sequence

from flatmount.image.tree import Inode


def extract(tree: Inode, path: str, blobs: Mapping[bytes, bytes] | None = None) -> None:
    """Create directory `path` (must not exist) holding `tree`, attributes and xattrs included."""
    seen: dict[int, str] = {}
    os.mkdir(path)
    _fill(tree, path, blobs or {}, seen)
    _attrs(tree, path)


def _fill(node: Inode, path: str, blobs: Mapping[bytes, bytes], seen: dict[int, str]) -> None:
    for name in sorted(node.entries):
        child = node.entries[name]
        p = os.path.join(path, os.fsdecode(name))
        if id(child) in seen:
            os.link(seen[id(child)], p)
            continue
        fmt = stat.S_IFMT(child.mode)
        if fmt == stat.S_IFDIR:
            os.mkdir(p)
            _fill(child, p, blobs, seen)
        elif fmt == stat.S_IFREG:
            data = child.content if child.content is not None else blobs.get(child.digest, b"")
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            seen[id(child)] = p
        elif fmt == stat.S_IFLNK:
            os.symlink(child.target, p)
        else:
            os.mknod(p, fmt | 0o600, child.rdev)
            seen[id(child)] = p
        _attrs(child, p)


def _attrs(node: Inode, path: str) -> None:
    """Owner first (chown clears set-id bits), then mode, xattrs, and the mtime last."""
    os.chown(path, node.uid, node.gid, follow_symlinks=False)
    if not node.is_symlink:
        os.chmod(path, stat.S_IMODE(node.mode))
    for k, v in sorted(node.xattrs.items()):
        os.setxattr(path, k, v, follow_symlinks=False)
    t = node.mtime_ns
    os.utime(path, ns=(t, t), follow_symlinks=False)


def mount_overlay(lowers_top_first: Sequence[str], target: str) -> None:
    """A read-only kernel overlay of plain directories (the reference c/storage would build)."""
    opts = "ro,lowerdir=" + ":".join(lowers_top_first)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, target], check=True,
                   capture_output=True)


def umount(target: str) -> None:
    subprocess.run(["umount", target], check=True, capture_output=True)


# --- stores -----------------------------------------------------------------------------------------

def store_image(store, trees: Sequence[Inode], name: str, *, parent: str | None = None,
                blobs: Sequence[bytes] = ()) -> list[str]:
    """Record `trees` as a layer chain (on top of layer `parent`, possibly in an additional store) and
    an image `name` whose top is the last one; `blobs` are put as objects.  Returns the layer ids."""
    import hashlib

    from flatmount.image.dump import dump_bytes
    from flatmount.store.batch import ImportBatch

    ids = []
    with ImportBatch(store) as batch:
        for data in blobs:
            batch.objects.put_bytes(data)
        for tree in trees:
            diff_id = "sha256:" + hashlib.sha256(dump_bytes(tree)).hexdigest()  # as pull_dir does
            parent = batch.add_layer(tree, parent=parent, diff_id=diff_id)
            ids.append(parent)
        image_id = hashlib.sha256(f"image {name} {parent}".encode()).hexdigest()
        batch.set_image(image_id, parent, names=[name])
        batch.commit()
    return ids


def file_tree(files: Mapping[str, bytes], mtime_ns: int = 10**18) -> Inode:
    """A layer root with regular files at slash-separated paths (directories made as needed)."""
    from objects.digest import fsverity_digest

    root = Inode.directory(mtime_ns=mtime_ns)
    for path, data in files.items():
        *dirs, leaf = path.encode().split(b"/")
        node = root
        for d in dirs:
            node = node.entries.setdefault(d, Inode.directory(mtime_ns=mtime_ns))
        if data == b"<whiteout>":
            node.entries[leaf] = Inode.whiteout()
        elif len(data) <= 64:
            node.entries[leaf] = Inode.file(data, mtime_ns=mtime_ns)
        else:
            node.entries[leaf] = Inode(stat.S_IFREG | 0o644, size=len(data), mtime_ns=mtime_ns,
                                       digest=fsverity_digest(data))
    return root
