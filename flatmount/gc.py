"""Garbage collection of the primary store: flattened images nobody needs, then unreferenced objects.

Why a collector and not reference counting: objects are shared by any number of layers, in one SQLite
table (`refs`, one row per owner and object) written in the same transaction as
the owner.  Deleting an owner only deletes rows; the space comes back when `gc` sweeps the objects no
row names any more.  Nothing in an additional store is ever touched (it is not even opened for writing).

Policy, in order:

1. Leases.  A lease (row of `leases`) is *live* while its mount dir is flock'ed (flatmount.mount is
   mounting or unmounting it: the lease is written before the mount is made) or when it was recorded
   on this boot and its merged dir is a mount point in the mount namespace it was made in (another
   namespace counts while it exists, flatmount.kernel.mntns); otherwise it is stale
   (flatmount.store.leases, the rule `cleanup` uses too).  Stale leases pin nothing and are left for `flatmount cleanup` /
   `fsck --repair` to drop.
2. Flattened images (`flat_images` rows, `images/<digest>.erofs` files) are kept when
   - their chain key is the top layer of an image record visible through the store (primary or
     additional store image, by name or id): that is the image `mount` would use, or
   - a live lease names their digest (a mounted image whose record was removed stays usable).
   Every other row is deleted, and its file removed unless a kept row or
   a live lease shares the digest.  Flat images of chain prefixes are not kept: flatten only reads them
   as a head start, and their objects are referenced by the chain's layers anyway.
   Files in `images/` with no row and no live lease (a flatten killed before its commit) are removed.
3. Layers are not collected: `rmi` (Store.remove_image) removes the primary layers no image uses, in
   the same transaction as the image.  Layer image files in `layers/` with no row (an import killed
   between rename and commit) are removed; rows of layers no image uses are only counted.
4. refs rows whose owner no longer exists (`layer:<id>` without a layer row; `flat:<digest>` rows,
   which earlier versions wrote for flattened images) are deleted.  A flattened image has no refs of
   its own: its objects are objects of its chain's layers (flatmount.flatten), pinned by their refs.
5. Objects: every object of the primary store that no remaining refs row names is deleted, except
   - objects whose ctime or mtime is newer than the start of this gc minus the grace period
     (`grace_s`, default DEFAULT_GRACE_S = 10 minutes): a writer that does not hold the GC lock may
     have put them and not committed yet (ctime changes on every link and rename, so an object just
     published by a put (link) or an import (rename from its staging dir) is fresh whatever its mtime);
   - objects of a leased image whose chain no image record names (a mounted image removed meanwhile:
     its image file is read to find them);
   - objects that an additional store's records reference but that store lacks (a mount of that
     store's image then finds them in the primary).
   Objects in additional stores are never deleted.  A store with objects but no database is refused
   (every object would look unreferenced).  The grace period protects objects a writer CREATED; a
   writer that finds its content already stored does not touch the file, so writers must hold the
   shared GC lock (all of flatmount's do) for that case.

Concurrency.  The whole computation and the sweep run under the EXCLUSIVE GC lock
(`Store.gc_lock(shared=False)`).  Imports and flatten hold it shared from their first object put to
their commit, so while gc runs no writer has objects on disk that are not yet referenced; mount
holds it shared from its flat-image lookup to its lease commit, so gc sees either no use of an image
or its lease.  The flat rows are deleted in one transaction that re-reads the leases first (a lease
written by a process that does not take the lock still protects its image if it commits first).  Order on disk: records first, files after, so a crash leaves only more garbage.

`dry_run=True` computes the same plan under the same lock and removes nothing; on a store opened
read-only it takes the lock through a read-only file descriptor (or none, if no writer ever created the
lock file) and writes nothing at all.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from flatmount.errors import ReadOnlyStoreError, StoreError
from flatmount.progress import EVERY, step
from flatmount.record import record
from flatmount.store import reftable
from flatmount.store.leases import read_leases
from flatmount.store.locks import store_lock
from flatmount.store.paths import derived_paths, scan_objects, wait_derived
from flatmount.store.refs import (
    has_db,
    kept_chain_keys,
    leased_objects,
    needed_by_additional,
    uncovered_leases,
)
from objects.paths import is_hex

if TYPE_CHECKING:  # pragma: no cover
    import sqlite3

    from flatmount.store.core import Store
    from flatmount.store.leases import Lease

DEFAULT_GRACE_S = 600.0
REMOVE_THREADS = 8     # unlinks in flight (measured: ~2.4x faster than one at a time on ext4)
REMOVE_BATCH = 512


def _erofs_files(d: os.PathLike) -> dict[str, str]:
    """<64 hex> -> path of the `<64 hex>.erofs` files in directory `d`."""
    out = {}
    try:
        with os.scandir(d) as it:
            for e in it:
                if e.name.endswith(".erofs") and is_hex(e.name[:-6], 64):
                    out[e.name[:-6]] = e.path
    except FileNotFoundError:
        pass
    return out


def image_files(store: Store) -> dict[str, str]:
    """digest -> path of `images/<64 hex>.erofs` files of a store."""
    return _erofs_files(store.root / "images")


def derived_orphans(store: Store) -> list[str]:
    """Files derived from a flattened image (`flatmount.store.paths.derived_paths`: its tree cache and
    diff index, `images/<digest>.tree|.index`) or from a layer image (`layers/<id>.tree`) whose
    `.erofs` is gone.  They are written after the image, so outside a writer's shared lock an
    image-less one is garbage."""
    out: list[str] = []
    for d, suffixes in ((store.root / "images", (".tree", ".index")), (store.layers_dir, (".tree",))):
        try:
            names = set(os.listdir(d))
        except FileNotFoundError:
            continue
        out += [str(d / n) for n in sorted(names)
                if n.endswith(suffixes) and is_hex(n.rpartition(".")[0], 64)
                and n.rpartition(".")[0] + ".erofs" not in names]
    return out


def layer_files(store: Store) -> dict[str, str]:
    """layer id -> path of `layers/<64 hex>.erofs` files of a store."""
    return _erofs_files(store.layers_dir)


def _age_stamp(st: os.stat_result) -> float:
    return max(st.st_mtime, st.st_ctime)


# --- gc ------------------------------------------------------------------------------------------

@record
class GcResult:
    """What one gc did (or, with dry_run, would do).  Byte counts are file sizes (st_size)."""

    dry_run: bool
    images_removed: tuple[str, ...]        # digests of flattened image files removed
    flat_rows_removed: tuple[str, ...]     # chain keys whose flat_images row was dropped
    layer_files_removed: tuple[str, ...]   # layer image files without a layer row
    refs_removed: int                      # refs rows of owners that no longer exist
    objects_removed: int
    object_bytes_freed: int
    bytes_freed: int                       # objects + image files + layer files
    images_kept: int                       # flat images (digests) kept
    objects_kept: int                      # objects of the primary store that are referenced
    objects_kept_recent: int               # unreferenced but younger than the grace period
    bytes_kept_recent: int
    objects_kept_additional: int           # unreferenced here but needed by an additional store
    leases_live: int
    leases_stale: int
    layers_unused: tuple[str, ...]         # primary layers no image's chain uses (rmi's business)
    grace_s: float
    seconds: float
    errors: tuple[str, ...]


class _Plan:
    """What a gc run found to remove and keep; filled in as it goes (a plain class: it changes)."""

    __slots__ = ("start", "remove_rows", "remove_images", "remove_layer_files", "dead_owners", "kept_digests",
                 "extra_live", "leases", "layers_unused", "covered", "extra_read", "dropped", "refs_removed")

    def __init__(self, start: float, remove_rows: list[tuple[str, str]], remove_images: dict[str, str],
                 remove_layer_files: dict[str, str], dead_owners: set[str], kept_digests: set[str],
                 extra_live: set[str], leases: list[Lease], layers_unused: list[str],
                 covered: set[str] | None = None, extra_read: set[str] | None = None) -> None:
        self.start = start
        self.remove_rows = remove_rows
        self.remove_images = remove_images               # digest -> path
        self.remove_layer_files = remove_layer_files
        self.dead_owners = dead_owners
        self.kept_digests = kept_digests
        self.extra_live = extra_live    # objects of leased images no image record covers (read from them)
        self.leases = leases
        self.layers_unused = layers_unused
        self.covered = set() if covered is None else covered   # digests of rows whose chain an image names
        self.extra_read = set() if extra_read is None else extra_read   # leased images whose objects are in extra_live
        self.dropped = False                # records deleted (not a dry run)
        self.refs_removed = 0


def gc(store: Store, dry_run: bool = False, grace_s: float = DEFAULT_GRACE_S) -> GcResult:
    """Collect garbage in the primary store `store` (policy in the module docstring)."""
    if store.is_additional:
        raise ReadOnlyStoreError(f"store {store.root} is an additional store: gc never touches it")
    if store.readonly and not dry_run:
        raise ReadOnlyStoreError(f"store {store.root} is opened read-only: only `gc --dry-run` works")
    t0 = time.monotonic()
    wait_derived()  # this process's derived-file writers hold the GC lock shared: let them finish
    start = time.time()
    if not store.root.is_dir():
        return _empty(dry_run, grace_s)
    errors: list[str] = []
    with store_lock(store, shared=False):
        if not has_db(store):
            if next(scan_objects(store.objects_dir), None) is not None:
                raise StoreError(f"store {store.root} has objects but no database ({store.db_path}): "
                                 "every object would look unreferenced; refusing to collect")
            plan = _Plan(start, [], {}, {}, set(), set(), set(), [], [])
            db = None
        else:
            store.require_sound_db("collect garbage")  # a damaged DB would make live objects look unreferenced
            db = store.connect()
            plan = _plan(store, db, start, grace_s)
        if not dry_run and db is not None:
            _drop_records(store, db, plan)
        live = _live_objects(store, db, plan) if db is not None else set()
        cutoff = start - grace_s
        candidates: list[tuple[str, int]] = []
        kept = recent = recent_bytes = 0
        for i, (obj, path) in enumerate(scan_objects(store.objects_dir)):
            if not i % EVERY:
                step("gc: scanning objects", i)
            if obj in live:
                kept += 1
                continue
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if _age_stamp(st) > cutoff:
                recent += 1
                recent_bytes += st.st_size
                continue
            candidates.append((obj, st.st_size))
        needed = needed_by_additional(store, [c[0] for c in candidates])
        other_freed = 0
        images_removed: list[str] = []
        layer_files_removed: list[str] = []
        if not dry_run:
            for digest, path in sorted(plan.remove_images.items()):
                n = _unlink(path, errors)
                if n is not None:
                    images_removed.append(digest)
                    other_freed += n
            for lid, path in sorted(plan.remove_layer_files.items()):
                n = _unlink(path, errors)
                if n is not None:
                    layer_files_removed.append(lid)
                    other_freed += n
            for path in derived_orphans(store):   # removed images' and layers' tree caches, diff indexes
                other_freed += _unlink(path, errors) or 0
        else:
            images_removed = sorted(plan.remove_images)
            layer_files_removed = sorted(plan.remove_layer_files)
            other_freed = sum(_size(p) for p in (*plan.remove_images.values(), *plan.remove_layer_files.values()))
            other_freed += sum(_size(p) for path in plan.remove_images.values() for p in derived_paths(path))
        doomed = [c for c in candidates if c[0] not in needed]
        if dry_run:
            removed, freed = len(doomed), sum(size for _, size in doomed)
        else:
            removed, freed = _remove_objects(store.objects, doomed, errors)
            if db is not None:
                _drop_verified_of_gone_files(store, db)
    leases = plan.leases
    return GcResult(
        dry_run=dry_run,
        images_removed=tuple(images_removed),
        flat_rows_removed=tuple(sorted(k for k, _ in plan.remove_rows)),
        layer_files_removed=tuple(layer_files_removed),
        refs_removed=plan.refs_removed,
        objects_removed=removed,
        object_bytes_freed=freed,
        bytes_freed=freed + other_freed,
        images_kept=len(plan.kept_digests),
        objects_kept=kept,
        objects_kept_recent=recent,
        bytes_kept_recent=recent_bytes,
        objects_kept_additional=len(needed),
        leases_live=sum(1 for lease in leases if lease.live),
        leases_stale=sum(1 for lease in leases if not lease.live),
        layers_unused=tuple(plan.layers_unused),
        grace_s=grace_s,
        seconds=round(time.monotonic() - t0, 3),
        errors=tuple(errors),
    )


def _empty(dry_run: bool, grace_s: float) -> GcResult:
    return GcResult(dry_run, (), (), (), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, (), grace_s, 0.0, ())


def _plan(store: Store, db: sqlite3.Connection, start: float, grace_s: float) -> _Plan:
    keys = kept_chain_keys(store)
    leases = read_leases(db)
    leased = {lease.image_digest for lease in leases if lease.live}
    rows = db.execute("SELECT chain_key, digest FROM flat_images").fetchall()
    kept_rows = [(k, d) for k, d in rows if k in keys or d in leased]
    remove_rows = [(k, d) for k, d in rows if not (k in keys or d in leased)]
    kept_digests = {d for _, d in kept_rows} | leased
    row_digests = {d for _, d in rows}
    cutoff = start - grace_s
    remove_images: dict[str, str] = {}
    for digest, path in image_files(store).items():
        if digest in kept_digests:
            continue
        if digest not in row_digests and _fresh(path, cutoff):
            continue  # no row yet: maybe a flatten that does not hold the lock
        remove_images[digest] = path
    layer_ids = {r[0] for r in db.execute("SELECT id FROM layers")}
    remove_layer_files = {lid: p for lid, p in layer_files(store).items()
                          if lid not in layer_ids and not _fresh(p, cutoff)}
    dead: set[str] = set()
    for owner in reftable.owners(db):
        kind, _, key = owner.partition(":")
        if kind == "layer":
            if key not in layer_ids:
                dead.add(owner)
        elif kind == "flat":  # rows of earlier versions: flat images hold no refs rows any more
            dead.add(owner)
    # a flat image whose chain an image record names has its objects pinned by that chain's layers;
    # a leased one beyond those (its record removed while it is mounted) pins what its file references
    covered = {d for k, d in rows if k in keys}
    extra_read = leased - covered
    extra_live = leased_objects(store, extra_read)
    used: set[str] = set()
    for top in keys:
        lid: str | None = top
        while lid is not None and lid not in used:
            used.add(lid)
            row = db.execute("SELECT parent FROM layers WHERE id = ?", (lid,)).fetchone()
            lid = row[0] if row else None
    unused = sorted(layer_ids - used)
    return _Plan(start, remove_rows, remove_images, remove_layer_files, dead, kept_digests, extra_live,
                 leases, unused, covered, extra_read)


def _fresh(path: str, cutoff: float) -> bool:
    try:
        return _age_stamp(os.lstat(path)) > cutoff
    except FileNotFoundError:
        return False


def _drop_records(store: Store, db: sqlite3.Connection, plan: _Plan) -> None:
    """Delete the planned flat rows and dead refs in one transaction, re-checking the leases first."""
    plan.dropped = True
    if not plan.remove_rows and not plan.dead_owners and not plan.remove_images:
        return
    with store.transaction() as tx:
        leased_now = {lease.image_digest for lease in read_leases(tx) if lease.live}
        newly = leased_now - plan.kept_digests
        if newly:  # a mount started meanwhile: keep its image and what it references
            plan.kept_digests |= newly
            plan.remove_rows = [(k, d) for k, d in plan.remove_rows if d not in newly]
            plan.extra_live |= leased_objects(store, newly - plan.covered)
            plan.extra_read |= newly - plan.covered
            for d in newly:
                plan.remove_images.pop(d, None)
        tx.executemany("DELETE FROM flat_images WHERE chain_key = ? AND digest = ?", plan.remove_rows)
        n = 0
        for owner in sorted(plan.dead_owners):
            n += reftable.delete_owner(tx, owner)
    plan.refs_removed = n


def _live_objects(store: Store, db: sqlite3.Connection, plan: _Plan) -> set[str]:
    """Objects named by refs rows of live owners, plus those of live leased images that no image
    record covers, all read in one snapshot: an `rmi` of a mounted image (deleting its layers' refs)
    either happened before it (the leased image is then read) or did not (its refs are still seen)."""
    db.execute("BEGIN")
    try:
        if plan.dead_owners and not plan.dropped:  # dry run: the dead rows are still there
            live, plan.refs_removed = reftable.referenced_except(db, plan.dead_owners)
        else:
            live = reftable.referenced(db)
        uncovered = uncovered_leases(store, db) - plan.extra_read
    finally:
        db.execute("COMMIT")
    return live | plan.extra_live | leased_objects(store, uncovered)


def _drop_verified_of_gone_files(store: Store, db: sqlite3.Connection) -> None:
    """`verified` rows (flatmount.store.integrity) of image files that no longer exist: a new file at that
    path would not match them anyway, they only take space."""
    try:
        gone = [(p,) for (p,) in db.execute("SELECT path FROM verified") if not os.path.exists(p)]
    except Exception:  # noqa: BLE001 - a DB of schema 1 has no such table
        return
    if gone:
        with store.transaction(durable=False) as tx:
            tx.executemany("DELETE FROM verified WHERE path = ?", gone)


def _remove_objects(objects, doomed: list[tuple[str, int]], errors: list[str]) -> tuple[int, int]:
    """Unlink objects (in directory order, several threads: unlink waits on the filesystem, not the
    GIL); (count, bytes) removed."""
    def batch(items: list[tuple[str, int]]) -> tuple[int, int, list[str]]:
        n = nbytes = 0
        errs = []
        for obj, size in items:
            try:
                objects.remove(obj, missing_ok=True)
            except Exception as e:  # noqa: BLE001 - one failure must not stop the sweep
                errs.append(f"cannot remove object {obj}: {e}")
                continue
            n += 1
            nbytes += size
        return n, nbytes, errs

    doomed = sorted(doomed)
    batches = [doomed[i:i + REMOVE_BATCH] for i in range(0, len(doomed), REMOVE_BATCH)]
    if len(batches) <= 1:
        results = [batch(b) for b in batches]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(REMOVE_THREADS, thread_name_prefix="gc-unlink") as ex:
            results = list(ex.map(batch, batches))
    removed = freed = 0
    for n, nbytes, errs in results:
        removed += n
        freed += nbytes
        errors.extend(errs)
    return removed, freed


def _size(path: str) -> int:
    try:
        return os.lstat(path).st_size
    except FileNotFoundError:
        return 0


def _unlink(path: str, errors: list[str]) -> int | None:
    """Remove a file; its size, or None if it could not be removed (error noted)."""
    try:
        size = os.lstat(path).st_size
        os.unlink(path)
        return size
    except FileNotFoundError:
        return None
    except OSError as e:
        errors.append(f"cannot remove {path}: {e.strerror}")
        return None
