"""Content-addressed flattened images in the store: the image of a chain from the cache, or written
from its longest cached prefix (two processes for a big one), recorded, and its derived files started."""

from __future__ import annotations

import contextlib
import os
import sys
import time

from flatmount.flatten.paths import _digest_of, cached_flat_image, chain_of, flat_image_path
from flatmount.log import debug
from flatmount.record import record

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: CLI start-up, see objects/lazy.py)

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Iterator, Sequence

    from flatmount.image.tree import Inode
    from flatmount.store.core import Store

# The writing side (helper, merge, trees) is imported by the functions that write: a mount of a
# cached image finds it with `paths` alone (CLI start-up, issue 17).


@record
class FlatImage:
    """A flattened image of one chain: `path` is `<store>/images/<digest>.erofs`."""

    digest: str                 # sha256 hex of the image bytes
    path: str
    chain_key: str              # the top layer id
    layers: tuple[str, ...]     # layer ids, base first
    reused: bool                # True when the cached image was used and nothing was written


def flatten_image(store: Store, ref: str) -> FlatImage:
    """The flattened image of image `ref` (name, id or id prefix), from the cache or freshly written."""
    return flatten_chain(store, chain_of(store, ref))


def flatten_chain(store: Store, chain: Sequence) -> FlatImage:
    """The flattened image of a layer chain (LayerRecords, base first), cached per top layer id."""
    ids = tuple(layer.id for layer in chain)
    key = ids[-1]
    path = cached_flat_image(store, key)
    if path is not None:
        return FlatImage(_digest_of(path), path, key, ids, True)
    from flatmount.errors import ReadOnlyStoreError

    if store.readonly:
        raise ReadOnlyStoreError(f"the flattened image of layer {key} is not cached and the primary "
                                 f"store {store.root_str} is opened read-only")
    # from here on, the arenas for the trees and the layout are populated ahead (from before the
    # imports and lookups below: a head start the populating thread needs, see _populated_arenas)
    with _populated_arenas(HEAP_PER_IMAGE_BYTE * _size_hint(None, chain)):
        return _flatten_new(store, chain, ids, key)


def _flatten_new(store: Store, chain: Sequence, ids: tuple[str, ...], key: str) -> FlatImage:
    """`flatten_chain` of a chain whose image is not cached (as far as it looked)."""
    from flatmount.flatten.trees import DERIVERS, _remember_tree

    # clean=False: the store's write-open cleaning (stale temp files, orphan layer files: a DB check
    # and scans, ~15 ms of a new process) is left to the next pull, rmi or gc; flatten makes nothing
    # that cleaning would have to wait for
    with store.gc_lock(shared=True, clean=False):
        path = cached_flat_image(store, key)  # another process may have written it meanwhile
        if path is not None:
            return FlatImage(_digest_of(path), path, key, ids, True)
        prefix, start, save = None, 0, False
        for i in range(len(ids) - 2, -1, -1):  # the longest cached proper prefix
            prefix = cached_flat_image(store, ids[i])
            if prefix is not None:  # its tree cache may be (re)written only in the primary store
                save = os.path.dirname(os.path.dirname(prefix)) == store.root_str
                start = i + 1
                break
        layers = list(chain[start:])
        store.ensure_writable(clean=False)
        # the helper is off unless turned on (helper.HELPER), which imports its module: not imported,
        # it is off, and its import (~1 ms of a new process) is not paid
        forked = sys.modules.get("flatmount.flatten.helper")
        helper = forked._Helper.start(store, lambda: _chain_tree(prefix, layers, save=False)) \
            if forked is not None and forked._helper_pays(prefix, chain) else None
        debug("flatten %s: %s", chain[-1].id[:12] if chain else "(empty chain)",
              "a forked helper writes half the image" if helper is not None else
              "this process writes the whole image (small chain, cached prefix or no helper)")
        # what the writer leaves to free (its layout): freed by the derived-file thread, once this
        # call returned, not before the image is recorded (~6 ms for a 64k-inode tree)
        garbage: list = []
        try:
            if helper is not None:
                tree, buf = helper.image(lambda: _chain_tree(prefix, layers, save=save))
            else:
                tree, buf = _chain_tree(prefix, layers, save=save), None
            digest, path, size, image_id = _write_image_file(store, tree, buf, garbage, _size_hint(prefix, layers))
            del buf
            _remember_tree(digest, tree)
            # not durable: a lost row costs one flatten again (the image is durable, named by content)
            from flatmount.store.integrity import record_verified

            st = os.lstat(path)   # (we hashed what we wrote: verified as of this identity, for mount)
            with store.transaction(durable=False, clean=False) as db:  # no refs rows: the chain's layers hold its objects
                db.execute("INSERT OR REPLACE INTO flat_images(chain_key, digest, created) VALUES (?, ?, ?)",
                           (key, digest, time.time()))
                record_verified(db, os.path.abspath(path), digest, st)
            # derived files once the image is recorded: started earlier, their thread would take the
            # GIL from this one at every release (the record's I/O) for a switch interval each time
            if helper is None or not helper.derive(path, digest, size, image_id):
                DERIVERS.start(store, path, tree, digest, size, image_id, garbage)
                garbage = []
        finally:
            if helper is not None:
                helper.close()
    return FlatImage(digest, path, key, ids, False)


# The memory flatten's trees and layout take, about, per byte of the chain's layer images (the
# 64k-inode chain: 18 MB of small-object arenas, 12.6 MB of layer images): the reserve
# `_populated_arenas` is given; none below RESERVE_MIN (a few arenas: not worth a thread).
HEAP_PER_IMAGE_BYTE = 2
RESERVE_MIN = 4 << 20
RESERVE_MAX = 256 << 20


@contextlib.contextmanager
def _populated_arenas(reserve: int = 0) -> Iterator[None]:
    """Within: Python's new small-object arenas get their pages at once (flatmount/flatten/_carena.c,
    optional: the trees and the writer's columns of a big chain are a few hundred thousand objects in
    fresh memory, and on the development VM faulting their pages in one at a time cost twice as much);
    the first `reserve` bytes of them (at most RESERVE_MAX) are mapped at once and populated ahead by
    another thread, on a second CPU where there is one."""
    from objects.compiled import load

    arena = load("flatmount.flatten._carena")
    if arena is None:
        yield
        return
    from objects.cpus import usable_cpus

    arena.push(min(reserve, RESERVE_MAX) if reserve >= RESERVE_MIN and usable_cpus() > 1 else 0)
    try:
        yield
    finally:
        arena.pop()


def _size_hint(prefix: str | None, layers: Sequence) -> int:
    """About how big the image of `prefix` plus `layers` gets: their images' sizes added (a layer
    image holds about what it adds to a flattened one; 0 where a file cannot be seen)."""
    try:
        return sum(os.stat(p).st_size for p in ([prefix] if prefix else []) + [r.image_path for r in layers])
    except OSError:
        return 0


def _chain_tree(prefix: str | None, layers: Sequence, *, save: bool) -> Inode:
    """The flattened tree of the flat image `prefix` (None: an empty root) with `layers` (records)
    applied in order.  Reads files only (no database): a helper process builds it too."""
    from flatmount.flatten.merge import apply_layer, default_root
    from flatmount.flatten.trees import flat_tree
    from flatmount.store.integrity import read_layer_tree

    tree = flat_tree(prefix, save=save) if prefix is not None else default_root()
    for layer in layers:
        tree = apply_layer(tree, read_layer_tree(layer))
    return tree


def write_flat_image(store: Store, tree: Inode, *, derived: bool = True) -> tuple[str, str]:
    """Write `tree` as `<root>/images/<sha256>.erofs` (temp in `<root>/tmp`, fsync, rename); with
    `derived`, its tree cache and diff index are then written beside it (`derived_paths`; best effort)
    by a background thread (`_Derivers`), so the caller can record and mount the image meanwhile.

    The caller holds `store.gc_lock(shared=True)` until the image is recorded (GC and `clean_tmp`
    treat files nobody records as garbage once that lock is free)."""
    from flatmount.flatten.trees import DERIVERS

    digest, path, size, image_id = _write_image_file(store, tree)
    if derived:
        DERIVERS.start(store, path, tree, digest, size, image_id)
    return digest, path


def _write_image_file(store: Store, tree: Inode, buf=None, keep: list | None = None,
                      size_hint: int = 0) -> tuple[str, str, int, bytes]:
    """`write_flat_image` without its derived files: (digest, path, size, xxh3-128 of the image).
    `buf`: the image of `tree` if already built (else it is built, written and hashed at once:
    flatmount.flatten.imagefile, `size_hint` its guess of the size); `keep`: see `image_buffer`."""
    store.ensure_writable(clean=False)   # (see flatten_chain)
    if buf is None:
        from flatmount.flatten.imagefile import write_streamed

        return write_streamed(store, tree, keep, size_hint)
    import xxhash

    from flatmount.atomic import AtomicFile
    from objects.sha256 import sha256

    with AtomicFile(store.tmp_str, prefix="flat-") as af:
        af.file.write(buf)
        # the image's names (sha256 for the file, xxh3-128 for the diff index) while it is fsynced
        digest, image_id = af.sync_while(lambda: (sha256(buf).hexdigest(), xxhash.xxh3_128_digest(buf)))
        path = af.commit(flat_image_path(store.root_str, digest))  # same bytes if it existed: content-addressed
    return digest, path, len(buf), image_id
