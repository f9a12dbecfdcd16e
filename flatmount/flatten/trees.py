"""Trees of flattened and layer images without parsing them: the last few in this process's memory,
and the tree cache files beside images (format: flatmount.image.treecache); and the background writers
of an image's derived files (tree cache, diff index).  See flatmount.flatten for why and when."""

from __future__ import annotations

import gc
import os

from flatmount.flatten.paths import _digest_of
from flatmount.image.tree import Inode
from flatmount.image.treecache import tree_cache_bytes, tree_from_cache
from flatmount.store.paths import DERIVED, DerivedWriters, derived_paths, layer_cache_path, wait_derived

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: CLI start-up, see objects/lazy.py)

if TYPE_CHECKING:  # pragma: no cover
    from flatmount.store.core import Store


# Flattened trees of the last images this process read or wrote, by image digest: extending a chain
# by one layer then costs one apply_layer and one write, no read.  Safe to share: trees are never
# modified (copy-on-write everywhere).
TREE_CACHE_SIZE = 2
_trees: dict[str, Inode] = {}


_drop_at_exit = False   # `_drop_trees` registered with atexit


def _remember_tree(digest: str, tree: Inode) -> None:
    global _drop_at_exit
    _trees.pop(digest, None)
    _trees[digest] = tree
    while len(_trees) > TREE_CACHE_SIZE:
        del _trees[next(iter(_trees))]
    if not _drop_at_exit:
        import atexit

        atexit.register(_drop_trees)
        _drop_at_exit = True


def _drop_trees() -> None:
    """At interpreter exit (after the derived-file threads are joined): forget the remembered trees.

    They hold no cycles, so reference counting frees them here at once; left in place, the shutdown's
    full collections would first walk their objects (two trees of a 64k-inode image: ~0.1 s of every
    `flatmount flatten` process's exit) only to find them alive, and free them later anyway."""
    _trees.clear()


def flat_tree(path: str, *, save: bool = False) -> Inode:
    """The tree of the flattened image at `path` (`.../<digest>.erofs`); do not modify it.

    From this process's memory, else from the image's tree cache, else read from the image (and,
    with `save`, for a writable store's image whose caller holds its GC lock shared, the tree cache
    written for next time)."""
    digest = _digest_of(path)
    tree = _trees.get(digest)
    if tree is None:
        tree = load_tree_cache(path)
        if tree is None:   # read from the image, once checked against its name
            from flatmount.image.reader import Image
            from flatmount.store.integrity import damaged_flat_image, read_file
            from objects.sha256 import sha256

            data = read_file(path)[0]
            actual = sha256(data).hexdigest()
            if actual != digest:
                raise damaged_flat_image(digest, path, actual)
            tree = Image(data).root()
            if save:
                save_tree_cache(path, tree)
    _remember_tree(digest, tree)
    return tree


# --- the tree cache ------------------------------------------------------------------------------
# The format and its codec are flatmount.image.treecache (versioned, bounds-checked, no marshal: an
# additional store's caches are another user's files).  It holds the tree the image was written from,
# which the writer turns into the same bytes as the tree read back from the image (what the in-memory
# cache relies on too).  A cache of another version is ignored (and rewritten) like a damaged one.

def load_tree_cache(image_path: str | os.PathLike) -> Inode | None:
    """The tree cached next to the image `.../images/<digest>.erofs`, or None (missing, damaged, or
    not that image's)."""
    wait_derived()  # one this process is writing is worth waiting for
    path = os.fspath(image_path)
    try:
        size = os.stat(path).st_size
        with open(derived_paths(path)[0], "rb") as f:
            data = f.read()
    except OSError:
        return None
    return tree_from_cache(data, _digest_of(path), size)


def load_layer_tree_cache(layer_image: str | os.PathLike) -> Inode | None:
    """The tree cached beside a layer image, or None (missing, damaged, or not that image's: the
    image is hashed to check, a few ms against the much longer parse it saves)."""
    from objects.sha256 import sha256

    try:
        with open(layer_image, "rb") as f:
            data = f.read()
        with open(layer_cache_path(layer_image), "rb") as f:
            cache = f.read()
    except OSError:
        return None
    return tree_from_cache(cache, sha256(data).hexdigest(), len(data))


def save_tree_cache(image_path: str | os.PathLike, tree: Inode) -> bool:
    """Write the tree cache next to a store's image (best effort; False when not written)."""
    path = os.fspath(image_path)
    try:
        size = os.stat(path).st_size
    except OSError:
        return False
    return _save_derived(path, derived_paths(path)[0], lambda: tree_cache_bytes(tree, _digest_of(path), size))


def _save_derived(image_path: str, dest: str, make) -> bool:
    """Write `make()` to `dest` beside a store image, atomically through the store's `tmp/` (which
    must exist: additional and foreign stores are never written); best effort."""
    from flatmount.atomic import AtomicFile

    tmp_dir = os.path.join(os.path.dirname(os.path.dirname(image_path)), "tmp")
    if not os.path.isdir(tmp_dir) or not os.access(tmp_dir, os.W_OK):
        return False
    try:
        data = make()
        with AtomicFile(tmp_dir, durable=False, prefix="derived-") as af:
            af.file.write(data)
            af.commit(dest)
    except (OSError, ValueError):
        return False
    return True


class _Derivers:
    """flatten's derived files (tree cache, diff index), written by the store's background writers
    (flatmount.store.paths.DERIVED: `wait_derived` waits for them, whoever asks)."""

    MAX_PENDING = DerivedWriters.MAX_PENDING

    def start(self, store: Store, path: str, tree: Inode, digest: str, size: int, image_id: bytes,
              garbage: object = None) -> None:
        """Write the derived files of the image at `path` in a background thread; `garbage` (what the
        caller leaves to free, e.g. the writer's layout) is dropped by that thread when it is done."""
        DERIVED.start(self.write_derived, store, path, tree, digest, size, image_id, garbage)

    def adopt(self, pid: int) -> None:
        DERIVED.adopt(pid)

    @staticmethod
    def write_derived(store: Store, path: str, tree: Inode, digest: str, size: int, image_id: bytes,
                      garbage: object = None) -> None:
        """Write the tree cache and diff index of the image at `path` (best effort, never raises);
        `garbage` is only held (and freed with this call's arguments)."""
        from flatmount.image.diffindex import encode as index_file_bytes

        tree_path, index_path = derived_paths(path)
        try:
            with store.gc_lock(shared=True, clean=False):   # (no store cleaning: see imagecache)
                enabled = gc.isenabled()
                gc.disable()  # both build many objects, none cyclic
                try:
                    for dest, make in ((tree_path, lambda: tree_cache_bytes(tree, digest, size)),
                                       (index_path, lambda: index_file_bytes(tree, image_id, size))):
                        if not os.path.exists(path):
                            return  # removed meanwhile (gc): nothing to derive it for
                        _save_derived(path, dest, make)
                finally:
                    if enabled:
                        gc.enable()
        except Exception:  # noqa: BLE001 - best effort: a missing cache is rebuilt when needed
            pass


DERIVERS = _Derivers()
