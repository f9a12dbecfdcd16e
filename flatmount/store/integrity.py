"""Verification of the store's EROFS images before they are used: layer images (against the sha256
recorded with the layer) and flattened images (against their name, `images/<sha256>.erofs`).

Why: without kernel fs-verity nothing else notices a flipped byte; a damaged layer image would flow
into every image flattened from it, and a damaged flattened image would be mounted as is.

Cost: a layer image is hashed whenever flatten reads it (its tree cache was already checked against
the image's sha256, so this adds nothing when the cache is used; a few ms per 10 MB otherwise).  A
flattened image is hashed at mount only if it was not verified since it was last written: each
verification (and flatten, which hashes what it writes) records the file's identity then (st_dev,
st_ino, size, mtime_ns, ctime_ns) with its digest in the primary's `verified` table, and a mount whose
file still has that identity pays one stat and one indexed SELECT.  Any write, rename or chmod of the
file changes its ctime and so forces a new hash.  (Bit rot below the file system changes no
timestamp: `flatmount fsck` hashes everything.)

Files are opened without following symlinks: the paths are under a store's directories.
"""

from __future__ import annotations

import os
import stat

from flatmount.errors import CorruptImageError, StoreError
from flatmount.store import reftable

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: CLI start-up, see objects/lazy.py)

if TYPE_CHECKING:  # pragma: no cover
    from flatmount.image.tree import Inode
    from flatmount.store.core import Store
    from flatmount.store.records import LayerRecord

Stamp = tuple[int, int, int, int, int]   # st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns


def stamp_of(st: os.stat_result) -> Stamp:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def read_file(path: str | os.PathLike) -> tuple[bytes, os.stat_result]:
    """A regular file's bytes and its fstat, opened with O_NOFOLLOW (OSError as from open)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptImageError(f"{os.fspath(path)} is not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read()
        return data, st
    finally:
        os.close(fd)


def read_layer_image(rec: LayerRecord) -> tuple[bytes, str]:
    """The layer's image bytes and their sha256 hex, checked against the digest recorded with the
    layer (layers recorded before digests were, have none: only what parsing checks)."""
    try:
        data, _st = read_file(rec.image_path)
    except FileNotFoundError:
        raise StoreError(f"layer {rec.id} in {rec.store_root}: image {rec.image_path} is missing "
                         "(store damaged; run fsck, then pull an image with this layer again)") from None
    except OSError as e:
        raise StoreError(f"layer {rec.id} in {rec.store_root}: cannot read {rec.image_path}: "
                         f"{e.strerror}") from None
    from objects.sha256 import sha256  # here, not at the top: a mount of a verified image hashes nothing

    digest = sha256(data).hexdigest()
    if rec.image_digest is not None and digest != rec.image_digest:
        raise CorruptImageError(f"layer {rec.id} in {rec.store_root}: image {rec.image_path} is damaged "
                                f"(sha256 {digest[:16]}..., recorded {rec.image_digest[:16]}...); pull an "
                                "image with this layer again to repair it (`flatmount fsck` lists them)")
    return data, digest


def damaged_flat_image(digest: str, path: str, actual: str) -> CorruptImageError:
    return CorruptImageError(f"flattened image {path} is damaged (its content hashes to {actual[:16]}..., "
                             f"not its name {digest[:16]}...): run `flatmount fsck --repair` (it "
                             "quarantines the file; the next mount makes it again)")


def record_verified(db, path: str, digest: str, st: os.stat_result) -> None:
    """Note (inside the caller's transaction on the primary) that `path` had sha256 `digest` with the
    identity `st`."""
    db.execute("INSERT OR REPLACE INTO verified(path, digest, dev, ino, size, mtime_ns, ctime_ns) "
               "VALUES (?, ?, ?, ?, ?, ?, ?)", (path, digest, *stamp_of(st)))


def verify_flat_image(store: Store, path: str, digest: str) -> bool:
    """Check that the flattened image at `path` hashes to `digest` unless it was verified since it was
    last written (see the module docstring); CorruptImageError if it does not.  Returns True when it
    was hashed now (False: the recorded verification still holds)."""
    from flatmount.store.sqlite import sqlite3

    path = os.path.abspath(path)
    db = store.connect()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise StoreError(f"flattened image {path} is missing (run fsck --repair)") from None
    try:
        row = db.execute("SELECT digest, dev, ino, size, mtime_ns, ctime_ns FROM verified WHERE path = ?",
                         (path,)).fetchone()
    except sqlite3.Error:
        row = None
    if row is not None and row[0] == digest and tuple(row[1:]) == stamp_of(st) and stat.S_ISREG(st.st_mode):
        return False
    try:
        data, st = read_file(path)
    except OSError as e:
        raise StoreError(f"cannot read flattened image {path}: {e.strerror}") from None
    from objects.sha256 import sha256

    actual = sha256(data).hexdigest()
    if actual != digest:
        raise damaged_flat_image(digest, path, actual)
    if not store.readonly:
        with store.transaction(durable=False) as tx:   # a lost row costs one hash again
            record_verified(tx, path, digest, st)
    return True


def layer_damage(store: Store, rec: LayerRecord) -> str | None:
    """What a recorded layer has lost, or None when intact: its image (missing, unreadable, or not the
    sha256 recorded with it) or an object its refs rows name that no object directory (primary, then
    the additional stores) holds.  Why: a pull of an image whose layers are "already present" must not
    leave them broken; ImportBatch imports such a layer again, which repairs it."""
    from flatmount.errors import FlatmountError
    from flatmount.store.sqlite import sqlite3

    try:
        read_layer_image(rec)
    except FlatmountError as e:
        return str(e)
    owner = next((s for s in (store, *store.additional) if s.root_str == rec.store_root), None)
    if owner is None:
        return None
    try:
        objs = reftable.objects_of(owner.connect(), "layer:" + rec.id)
    except sqlite3.Error as e:
        return f"layer {rec.id}: cannot read its records: {e}"
    fds = []
    try:
        for d in store.object_dirs():
            try:
                fds.append(os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            except OSError:
                continue
        for obj in objs:   # (relative to each dir's fd: a short lookup per object, primary first)
            if not any(_is_file(fd, obj) for fd in fds):
                return f"layer {rec.id}: object {obj} is missing"
    finally:
        for fd in fds:
            os.close(fd)
    return None


def _is_file(dirfd: int, rel: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(rel, dir_fd=dirfd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def read_layer_tree(rec: LayerRecord) -> Inode:
    """A recorded layer's tree (whiteouts and opaque markers kept): from the tree cache written beside
    its image at import when it is there and matches, else read from the image.  The image is first
    checked against the sha256 recorded with the layer (flatmount.store.integrity), so a damaged one never
    flows into a flattened image.  Reads files only (no database), so a flatten helper process may
    call it too."""
    from flatmount.image.treecache import tree_from_cache
    from flatmount.store.paths import layer_cache_path

    data, digest = read_layer_image(rec)
    try:
        with open(layer_cache_path(rec.image_path), "rb") as f:
            tree = tree_from_cache(f.read(), digest, len(data))
    except OSError:
        tree = None
    if tree is not None:
        return tree
    # (imported only now: the reader's import costs more than decoding the cache)
    from flatmount.image.reader import Image

    return Image(data).root()
