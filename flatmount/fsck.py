"""Consistency check of a store and its additional stores, and repair of what can be fixed without loss.

Why: a store is files plus records, written by processes that may be killed at any point.  The write
rules (objects before refs, records before files on delete, one transaction per owner) keep the
damage from a crash to garbage, but disks, people and bugs can do worse.  fsck says exactly what is
wrong, and `repair=True` fixes what needs no lost data.

Checks (kind: severity; what --repair does):
- corrupt-db (error, not repairable): SQLite's integrity_check of a store's flatmount.db fails, or
  the DB is empty (0 bytes, no schema) or missing while the store holds layer images or objects.  The
  records of such a store are not checked (nor its objects judged orphans); gc, rmi and every write
  refuse to run on it (flatmount.store.core.Store.require_sound_db).  Restore flatmount.db from a backup.
- corrupt-object (error): an object whose fs-verity digest is not its name; every object of every
  store, or a random `sample` (a fraction 0 < p <= 1, or a count).  Repair (primary only): move it to
  `<root>/quarantine/<64 hex>` (never deleted: it may be evidence); if an image needs it, it is then
  reported missing.
- missing-object (error, not repairable): an object some layer or flat image in use references (by
  refs row or by its image content) that no store has.  Re-pull the images named in the detail.  (A
  flat image whose chain no image names and that is not mounted is a cache row gc drops next: its
  objects are not required.)
- missing-layer-image / corrupt-layer-image (error, not repairable here): a layer row whose
  `layers/<id>.erofs` is missing, unreadable, or does not hash to the sha256 recorded with the layer
  (flatmount.store.integrity).  Pulling an image with that layer again rewrites it (flatmount.pull).  dangling-parent / dangling-image (error, not
  repairable): a layer whose parent, or an image whose top layer, is in no store.
- dangling-name (error; repair drops it): a name pointing at an image in no store.
- missing-flat-image (error; repair drops the flat_images row): the cached image is re-made on the
  next mount.
- corrupt-flat-image (error; repair quarantines the file and drops the row as above): an
  `images/<digest>.erofs` whose sha256 is not its name, or that cannot be read.
- refs-missing / refs-extra (error; repair rewrites the layer's rows from its image): refs rows of a
  layer that disagree with the objects its image references (recomputed with
  flatmount.image.reader.collect_objects).  A missing row is dangerous: gc would delete the object.
  Flattened images hold no refs rows (their chain's layers do, flatmount.flatten); the objects they
  reference are still checked to exist.
- stale-lease (error; repair runs flatmount.mount.cleanup, which deletes the row and rmdir()s its
  dirs): a lease of another boot or whose merged dir is not mounted, and whose mount dir nobody has
  flock'ed (the rule of flatmount.gc and flatmount.mount.cleanup).
Notices (never make fsck fail; what crashes and normal operation leave behind):
- orphan-object: a primary object no refs row names (`flatmount gc` removes it).
- orphan-image-file / orphan-layer-file: an image file without a row (gc removes it).
- dangling-refs: refs rows of an owner that no longer exists, or `flat:` rows that earlier versions
  wrote for flattened images (repair deletes them, as gc would).
- unverified-layer: a layer recorded under `flatmount.store.records.unverified_chain_id` (a c/storage layer
  whose content could not be proven to hash to its claimed diff_id: no or mismatching tar-split
  data).  It is used only by the images imported with it; a digest-verified pull of the same diff_id
  imports the real layer beside it (flatmount.sources.cstorage.pull_cstorage).
- layer-digest-missing: a layer recorded before layer image digests were (schema 1).  Repair records
  its image's sha256 when the layer's tree cache, written at import from the same bytes and whole by
  its own checksum, names that sha256 (a cache naming another one makes the image corrupt-layer-image);
  without such a cache it stays unproven (a re-pull that repairs the layer records it).
- temp-leftover: an entry of `<root>/tmp/` or `objects/.tmp/` no writer uses (repair removes it).
  When no writer holds the GC lock every entry nobody has flock'ed is a leftover; otherwise only those
  older than a day.

Additional stores are checked the same way but never written: their problems are reported as not
repairable.  `ok` is False when an error remains; the CLI then exits 1, like fsck tools.

Locking: a check holds the GC lock shared (imports may run, gc may not); `repair=True` holds it
exclusive, so no writer is between its first put and its commit while records are rewritten.  The
records are read in one SQLite transaction and the object dirs listed after it (an import puts
objects before it commits their refs, and only gc deletes objects); a finding about a layer, image or
name that `rmi` removed meanwhile is re-checked against the current rows and dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import stat
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from flatmount.errors import FlatmountError, ReadOnlyStoreError, StoreError
from flatmount.gc import image_files, layer_files
from flatmount.progress import EVERY, step
from flatmount.record import field, record
from flatmount.store import reftable
from flatmount.store.leases import read_leases
from flatmount.store.locks import entry_held, gc_lock_if_idle, store_lock
from flatmount.store.paths import scan_objects, wait_derived
from flatmount.store.refs import has_db

if TYPE_CHECKING:  # pragma: no cover

    from flatmount.store.core import Store

ERROR, NOTICE = "error", "notice"
KINDS = {
    "corrupt-object": ERROR, "missing-object": ERROR, "missing-layer-image": ERROR,
    "corrupt-layer-image": ERROR, "dangling-parent": ERROR, "dangling-image": ERROR,
    "dangling-name": ERROR, "missing-flat-image": ERROR, "corrupt-flat-image": ERROR,
    "refs-missing": ERROR, "refs-extra": ERROR, "stale-lease": ERROR, "corrupt-db": ERROR,
    "orphan-object": NOTICE, "orphan-image-file": NOTICE, "orphan-layer-file": NOTICE,
    "dangling-refs": NOTICE, "temp-leftover": NOTICE, "unverified-layer": NOTICE,
    "layer-digest-missing": NOTICE,
}
STALE_TMP_AGE_S = 24 * 3600
QUARANTINE = "quarantine"


@record
class Problem:
    """One finding.  `repaired`: fixed by this run; `note`: what was done, or why it cannot be."""

    kind: str
    severity: str
    store_root: str
    subject: str
    detail: str
    repaired: bool = False
    note: str = ""


@record
class FsckResult:
    ok: bool                          # no error-severity problem remains
    repair: bool
    problems: tuple[Problem, ...]
    objects: int                      # object files seen, all stores
    objects_verified: int             # digests recomputed
    layers: int
    flat_images: int
    leases: int
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)   # kind -> number of findings

    @property
    def remaining(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == ERROR and not p.repaired)


class _Run:
    def __init__(self, store: Store, repair: bool, sample: float | int | None):
        self.store = store
        self.repair = repair
        self.sample = sample
        self.problems: list[Problem] = []
        self.stores = [store, *store.additional]
        self.present: dict[str, set[str]] = {}        # store root -> objects held
        self.paths: dict[str, dict[str, str]] = {}    # store root -> object -> abs path
        self.needed: dict[str, dict[str, set[str]]] = {}   # store root -> owner -> objects (truth)
        self.leases = []
        self.verified = 0
        self.nlayers = self.nflat = 0

    def add(self, kind: str, s: Store, subject: str, detail: str, repaired: bool = False,
            note: str = "") -> None:
        self.problems.append(Problem(kind, KINDS[kind], str(s.root), subject, detail, repaired, note))

    def can_repair(self, s: Store) -> bool:
        return self.repair and s is self.store


def fsck(store: Store, repair: bool = False, sample: float | int | None = None) -> FsckResult:
    """Check `store` and its additional stores (see the module docstring); fix what `repair` can."""
    if repair and store.readonly:
        raise ReadOnlyStoreError(f"store {store.root} is opened read-only: fsck --repair needs it writable")
    if sample is not None and (sample < 0 or (isinstance(sample, float) and sample > 1)):
        raise StoreError(f"sample must be a count >= 0 or a fraction in (0, 1], not {sample!r}")
    t0 = time.monotonic()
    wait_derived()  # this process's derived-file writers (flatmount.flatten) finish first
    run = _Run(store, repair, sample)
    idle_tmp = None if repair or not store.root.is_dir() else _idle_tmp_entries(store)
    with store_lock(store, shared=not repair) if store.root.is_dir() else contextlib.nullcontext():
        sound = {str(s.root): _check_db(run, s) for s in run.stores}
        run.leases = read_leases(store.connect()) if has_db(store) and sound[str(store.root)] else []
        for s in run.stores:
            if has_db(s) and sound[str(s.root)]:
                _check_records(run, s)
                _check_unverified(run, s)
        # objects are listed AFTER the records: an import committing meanwhile adds objects before
        # its refs, and only gc (excluded by our lock) deletes them
        for s in run.stores:
            for i, (obj, path) in enumerate(scan_objects(s.objects_dir)):
                if not i % EVERY:
                    step(f"fsck: listing objects of {s.root}", i)
                run.present.setdefault(str(s.root), set()).add(obj)
                run.paths.setdefault(str(s.root), {})[obj] = path
        _check_leases(run)
        _verify_objects(run)
        _check_missing(run)
        if sound[str(store.root)]:   # (with its records unread, every object would look orphaned)
            _check_orphans(run)
        if store.root.is_dir():
            _check_tmp(run, idle_tmp)
    problems = tuple(run.problems)
    counts: dict[str, int] = {}
    for p in problems:
        counts[p.kind] = counts.get(p.kind, 0) + 1
    return FsckResult(
        ok=not any(p.severity == ERROR and not p.repaired for p in problems),
        repair=repair, problems=problems,
        objects=sum(len(v) for v in run.present.values()), objects_verified=run.verified,
        layers=run.nlayers, flat_images=run.nflat, leases=len(run.leases),
        seconds=round(time.monotonic() - t0, 3), counts=counts)


# --- the database itself ------------------------------------------------------------------------

def _check_db(run: _Run, s: Store) -> bool:
    """SQLite's integrity_check of the store's DB, and an empty DB in a store that holds data; True
    when sound (its records can then be checked).  Not repairable: restore flatmount.db from a backup."""
    problems = s.db_problems(full=True)
    for p in problems[:20]:
        run.add("corrupt-db", s, str(s.db_path), p,
                note="not repairable: restore flatmount.db from a backup; gc, rmi and writes refuse meanwhile")
    if len(problems) > 20:
        run.add("corrupt-db", s, str(s.db_path), f"{len(problems) - 20} more problems", note="not repairable")
    return not problems


# --- records: layers, flat images, refs, images, names --------------------------------------------

def _collect_layer(path: str, image_digest: str | None) -> tuple[set[str], str]:
    """The objects a layer image references and its sha256, once its bytes match the sha256 recorded
    with the layer (layers recorded before digests were have none: see `_witness`)."""
    from flatmount.errors import CorruptImageError
    from flatmount.image.reader import Image, collect_objects
    from flatmount.store.integrity import read_file

    data = read_file(path)[0]
    actual = hashlib.sha256(data).hexdigest()
    if image_digest is not None and actual != image_digest:
        raise CorruptImageError(f"content hashes to {actual}, recorded {image_digest}")
    if image_digest is None and _witness(path) not in (None, actual):
        raise CorruptImageError(f"content hashes to {actual}, but its tree cache was made at import from "
                                f"an image of sha256 {_witness(path)}")
    return collect_objects(Image(data)), actual


def _witness(path: str) -> str | None:
    """The sha256 of the image a layer's tree cache was made from at import (written once, from the
    same bytes as the image), if the cache is whole (its own checksum holds); else None."""
    from flatmount.errors import FormatError
    from flatmount.image.treecache import read_header
    from flatmount.store.paths import layer_cache_path

    try:
        with open(layer_cache_path(path), "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        return read_header(data)[0]
    except FormatError:
        return None


def _snapshot(db, digest_col: str = "NULL") -> dict[str, list[tuple]]:
    """Every table fsck compares, read in ONE transaction (a consistent view while imports commit)."""
    queries = {"layers": f"SELECT id, parent, {digest_col} FROM layers",
               "flat": "SELECT chain_key, digest FROM flat_images", "images": "SELECT id, top_layer FROM images",
               "names": "SELECT name, image_id FROM names"}
    db.execute("BEGIN")
    try:
        return {k: db.execute(q).fetchall() for k, q in queries.items()} | {"refs": reftable.rows(db)}
    finally:
        db.execute("COMMIT")


def _still(db, sql: str, *params) -> bool:
    """Whether a row exists NOW: findings from the snapshot are re-checked before an rmi makes them
    false alarms (it deletes rows, then files)."""
    return db.execute(sql, params).fetchone() is not None


def _check_records(run: _Run, s: Store) -> None:
    db = s.connect()
    snap = _snapshot(db, s._layer_cols().rsplit(", ", 1)[1])
    refs: dict[str, set[str]] = {}
    for owner, obj in snap["refs"]:
        refs.setdefault(owner, set()).add(obj)
    needed = run.needed.setdefault(str(s.root), {})
    store = run.store
    rewrite: dict[str, set[str]] = {}      # owner -> objects its rows must be
    backfill: dict[str, str] = {}          # layer id -> its image's sha256, proven (`_witness`)
    has_digest_col = s._layer_cols().endswith("image_digest")
    drop_owners: set[str] = set()
    # layers
    layer_rows = snap["layers"]
    layer_ids = {r[0] for r in layer_rows}
    layer_now = "SELECT 1 FROM layers WHERE id = ?"
    for lid, parent, image_digest in layer_rows:
        run.nlayers += 1
        owner = "layer:" + lid
        if parent is not None and not store.has_layer(parent) and _still(
                db, "SELECT 1 FROM layers WHERE id = ? AND NOT EXISTS (SELECT 1 FROM layers WHERE id = ?)",
                lid, parent):   # (in one query: an rmi and a re-pull may both have happened since)
            run.add("dangling-parent", s, lid, f"parent layer {parent} is in no store", note="not repairable")
        path = s.layer_image_path(lid)
        if not os.path.exists(path):
            if not _still(db, layer_now, lid):
                continue  # removed meanwhile
            run.add("missing-layer-image", s, lid, f"{path} is missing",
                    note="not repairable: re-pull an image containing this layer")
            needed[owner] = refs.get(owner, set())
            continue
        try:
            content, actual = _collect_layer(path, image_digest)
        except (FlatmountError, OSError) as e:
            if not _still(db, layer_now, lid):
                continue
            run.add("corrupt-layer-image", s, lid, f"{path}: {e}",
                    note="not repairable: re-pull an image containing this layer")
            needed[owner] = refs.get(owner, set())
            continue
        needed[owner] = content
        if image_digest is None and has_digest_col:
            proven = _witness(path) == actual
            run.add("layer-digest-missing", s, lid, "recorded before layer image digests were",
                    repaired=proven and run.can_repair(s),
                    note=("recorded (its tree cache from import proves the image)" if proven and run.can_repair(s)
                          else "fsck --repair records it" if proven and s is store
                          else _ro_note(run, s) if proven else
                          "unproven (no tree cache from import): pull an image with this layer again"))
            if proven:
                backfill[lid] = actual
        if _compare_refs(run, s, owner, content, refs.get(owner, set())):
            rewrite[owner] = content
    # flat images
    leased = {lease.image_digest for lease in run.leases if lease.live} if s is store else set()
    flat_rows = snap["flat"]
    digests = {d for _, d in flat_rows}
    # flat images in use: of a chain an image names (its layers pin the objects), or mounted; the
    # others are cache rows gc drops next, whose objects gc may already have taken
    images = store.images()
    tops = {img.top_layer for img in images if img.top_layer}
    in_use = {d for k, d in flat_rows if k in tops} | leased
    bad_digests: dict[str, str] = {}   # digest -> problem kind
    checked: set[str] = set()
    for key, digest in flat_rows:
        run.nflat += 1
        path = os.path.join(s.root, "images", digest + ".erofs")
        owner = "flat:" + digest
        if digest in bad_digests:
            kind = bad_digests[digest]
            run.add(kind, s, key, f"flat image {digest} of chain {key}: see above",
                    repaired=run.can_repair(s), note=_flat_note(run, s))
            continue
        if digest in checked:
            continue
        checked.add(digest)
        err, content = _check_flat_file(path, digest)
        if err is not None:
            kind = "missing-flat-image" if err == "missing" else "corrupt-flat-image"
            bad_digests[digest] = kind
            run.add(kind, s, key, f"flat image {digest} of chain {key}: {err}",
                    repaired=run.can_repair(s), note=_flat_note(run, s))
            continue
        if digest in in_use:
            needed[owner] = content  # (no refs rows to compare: its chain's layers hold them)
    # leased images without a row: what they reference must still be there
    for digest in sorted(leased - digests):
        path = os.path.join(s.root, "images", digest + ".erofs")
        err, content = _check_flat_file(path, digest)
        if err is None:
            needed["flat:" + digest] = content
    # refs of owners that do not exist; `flat:` rows are all left from earlier versions (flat images
    # hold no refs rows of their own now)
    for owner in sorted(refs):
        kind, _, key = owner.partition(":")
        if kind == "layer" and key in layer_ids:
            continue
        if kind not in ("layer", "flat"):
            continue  # not ours to judge
        what = ("refs rows of a flattened image (flat images hold none now)" if kind == "flat"
                else "refs rows of an owner that does not exist")
        run.add("dangling-refs", s, owner, f"{len(refs[owner])} {what}",
                repaired=run.can_repair(s), note="deleted" if run.can_repair(s) else
                ("gc deletes them" if s is store else "additional store: read-only"))
        drop_owners.add(owner)
    # images and names
    for iid, top in snap["images"]:
        if top is not None and not store.has_layer(top) and _still(
                db, "SELECT 1 FROM images WHERE id = ? AND NOT EXISTS (SELECT 1 FROM layers WHERE id = ?)",
                iid, top):
            run.add("dangling-image", s, iid, f"top layer {top} is in no store", note="not repairable")
    image_ids = {img.id for img in images}
    # (still pointing nowhere NOW: an rmi and a re-pull of the same image may both have happened since)
    bad_names = [(n, i) for n, i in snap["names"] if i not in image_ids
                 and _still(db, "SELECT 1 FROM names WHERE name = ? AND image_id = ? AND NOT EXISTS "
                                "(SELECT 1 FROM images WHERE id = ?)", n, i, i)]
    for name, iid in bad_names:
        run.add("dangling-name", s, name, f"points at image {iid}, which is in no store",
                repaired=run.can_repair(s), note="deleted" if run.can_repair(s) else _ro_note(run, s))
    # files without rows (notices)
    if s is store:
        for digest, path in sorted(image_files(s).items()):
            if digest not in digests and digest not in leased:
                run.add("orphan-image-file", s, path, "flattened image without a flat_images row",
                        note="gc removes it")
        for lid, path in sorted(layer_files(s).items()):
            if lid not in layer_ids:
                run.add("orphan-layer-file", s, path, "layer image without a layer row", note="gc removes it")
    if run.can_repair(s):
        _repair_records(run, s, rewrite, drop_owners, bad_digests, leased, flat_rows,
                        [n for n, _ in bad_names], backfill)


def _compare_refs(run: _Run, s: Store, owner: str, content: set[str], rows: set[str]) -> bool:
    """Report disagreement between an owner's refs rows and its image; True if they differ."""
    lacking = content - rows
    extra = rows - content
    note = "rewritten from the image" if run.can_repair(s) else _ro_note(run, s)
    if lacking:
        run.add("refs-missing", s, owner, f"{len(lacking)} objects the image uses have no refs row "
                f"(e.g. {min(lacking)})", repaired=run.can_repair(s), note=note)
    if extra:
        run.add("refs-extra", s, owner, f"{len(extra)} refs rows name objects the image does not use "
                f"(e.g. {min(extra)})", repaired=run.can_repair(s), note=note)
    return bool(lacking or extra)


def _ro_note(run: _Run, s: Store) -> str:
    return "additional store: read-only" if s is not run.store else "run fsck --repair"


def _flat_note(run: _Run, s: Store) -> str:
    if run.can_repair(s):
        return "row dropped (re-made on the next mount)"
    return _ro_note(run, s)


def _check_flat_file(path: str, digest: str) -> tuple[str | None, set[str]]:
    """(None, objects it references) if the file exists, hashes to its name and parses; else (what is
    wrong, empty set)."""
    from flatmount.image.reader import Image, collect_objects

    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return "missing", set()
    except OSError as e:
        return f"unreadable: {e.strerror}", set()
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        return f"content hashes to {actual}", set()
    try:
        return None, collect_objects(Image(data))
    except FlatmountError as e:
        return f"unreadable: {e}", set()


def _repair_records(run: _Run, s: Store, rewrite: dict[str, set[str]], drop_owners: set[str],
                    bad_digests: dict[str, str], leased: set[str], flat_rows: list[tuple[str, str]],
                    bad_names: list[str], backfill: dict[str, str] | None = None) -> None:
    quarantine: list[str] = []
    with s.transaction() as tx:
        for lid, digest in sorted((backfill or {}).items()):
            tx.execute("UPDATE layers SET image_digest = ? WHERE id = ? AND image_digest IS NULL", (digest, lid))
        for owner, objs in sorted(rewrite.items()):
            kind, _, key = owner.partition(":")
            if kind == "layer" and not _still(tx, "SELECT 1 FROM layers WHERE id = ?", key):
                continue  # removed by rmi meanwhile: its refs went with it
            reftable.delete_owner(tx, owner)
            reftable.insert_paths(tx, owner, objs)
        for digest, kind in sorted(bad_digests.items()):
            tx.execute("DELETE FROM flat_images WHERE digest = ?", (digest,))
            if kind == "corrupt-flat-image":
                quarantine.append(digest)
        for owner in sorted(drop_owners):
            reftable.delete_owner(tx, owner)
        for name in bad_names:
            tx.execute("DELETE FROM names WHERE name = ?", (name,))
    for digest in quarantine:
        src = os.path.join(s.root, "images", digest + ".erofs")
        if os.path.exists(src):
            _quarantine(s, src, f"image-{digest}.erofs")


# --- leases --------------------------------------------------------------------------------------

def _check_leases(run: _Run) -> None:
    """Stale leases; repair goes through flatmount.mount.cleanup (the one owner of mount dirs)."""
    s = run.store
    stale = [lease for lease in run.leases if not lease.live]
    if stale:
        # judged after the snapshot that listed them: an unmount that finished meanwhile deleted its
        # row before releasing its lock, so a lease still recorded now and stale again is really stale
        from flatmount.store.leases import judge_lease

        # (judge first, then look for the row: the other order has the same race)
        db = s.connect()
        stale = [j for j in map(judge_lease, stale)
                 if not j.live and db.execute("SELECT 1 FROM leases WHERE id = ?", (j.id,)).fetchone()]
    removed: set[str] = set()
    if stale and run.can_repair(s):
        from flatmount.mount import cleanup

        removed = set(cleanup(s).removed_leases)
    for lease in stale:
        done = lease.id in removed
        note = "deleted (flatmount cleanup)" if done else (
            "still busy or unremovable" if run.repair else "run `flatmount cleanup` or fsck --repair")
        run.add("stale-lease", s, lease.id, f"{lease.merged} (image {lease.image_digest[:12]}, "
                f"pid {lease.pid}): {lease.stale_reason}", repaired=done, note=note)


# --- objects -------------------------------------------------------------------------------------

def _verify_objects(run: _Run) -> None:
    from objects.digest import digest_file

    every = [(root, obj) for root in sorted(run.present) for obj in sorted(run.present[root])]
    sample = run.sample
    if sample is None:
        chosen = every
    elif isinstance(sample, float):
        chosen = random.sample(every, math.ceil(len(every) * sample)) if every else []
    else:
        chosen = random.sample(every, min(int(sample), len(every)))
    roots = {str(s.root): s for s in run.stores}
    for i, (root, obj) in enumerate(chosen):
        step("fsck: verifying objects", i, len(chosen))
        s = roots[root]
        path = run.paths[root][obj]
        try:
            actual = digest_file(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            actual = None
            why = f"unreadable: {e.strerror}"
        else:
            why = f"content has digest {actual.hex()}"
        run.verified += 1
        if actual is not None and actual.hex() == obj.replace("/", ""):
            continue
        repaired = False
        note = _ro_note(run, s)
        if run.can_repair(s):
            dest = _quarantine(s, path, obj.replace("/", ""))
            repaired = dest is not None
            note = f"moved to {dest}" if dest else "could not be moved"
            if repaired:
                run.present[root].discard(obj)
        run.add("corrupt-object", s, obj, why, repaired=repaired, note=note)


def _quarantine(s: Store, path: str, name: str) -> str | None:
    qdir = os.path.join(s.root, QUARANTINE)
    os.makedirs(qdir, mode=0o700, exist_ok=True)
    dest = os.path.join(qdir, name)
    n = 0
    while os.path.exists(dest):
        n += 1
        dest = os.path.join(qdir, f"{name}.{n}")
    try:
        os.rename(path, dest)
    except OSError:
        return None
    return dest


def _check_missing(run: _Run) -> None:
    """Objects some owner needs that no store holds (lookup covers the primary and every AIS)."""
    anywhere: set[str] = set().union(*run.present.values()) if run.present else set()
    missing: dict[str, list[str]] = {}
    for root, owners in run.needed.items():
        for owner, objs in owners.items():
            for obj in objs - anywhere:
                missing.setdefault(obj, []).append(f"{owner} ({root})")
    if not missing:
        return
    images = _images_by_owner(run)
    for obj in sorted(missing):
        owners = sorted(missing[obj])
        names = sorted({n for o in owners for n in images.get(o.split(" ", 1)[0], ())})
        detail = "needed by " + ", ".join(owners)
        if names:
            detail += "; images: " + ", ".join(names)
        run.add("missing-object", run.store, obj, detail, note="not repairable: re-pull those images")


def _images_by_owner(run: _Run) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for img in run.store.images():
        if not img.top_layer:
            continue
        label = img.names[0] if img.names else img.id[:12]
        try:
            chain = run.store.layer_chain(img.top_layer)
        except StoreError:
            continue
        for rec in chain:
            out.setdefault("layer:" + rec.id, set()).add(label)
    return out


def _check_orphans(run: _Run) -> None:
    s = run.store
    if not has_db(s):
        refd: set[str] = set()
    else:
        refd = reftable.referenced(s.connect())
    for owners in run.needed.get(str(s.root), {}).values():
        refd |= owners
    for root, owners in run.needed.items():   # objects an AIS needs but lacks are not orphans here
        if root != str(s.root):
            for objs in owners.values():
                refd |= objs
    for obj in sorted(run.present.get(str(s.root), set()) - refd):
        run.add("orphan-object", s, obj, "referenced by no layer or flat image", note="gc removes it")


# --- temp leftovers ------------------------------------------------------------------------------

def _tmp_entries(store: Store) -> Iterator[os.DirEntry]:
    for d in (store.tmp_dir, store.objects_dir / ".tmp"):
        try:
            with os.scandir(d) as it:
                yield from list(it)
        except FileNotFoundError:
            continue


def _flocked(entry: os.DirEntry) -> bool:
    """Whether a live process holds an flock on the entry (a writer marks its staging dir this way)."""
    return entry_held(entry.path)


def _idle_tmp_entries(store: Store) -> set[str] | None:
    """Paths of tmp entries seen while no writer held the GC lock (None if a writer holds it)."""
    with gc_lock_if_idle(store) as idle:
        if idle is False:
            return None
        return {e.path for e in _tmp_entries(store) if not _flocked(e)}


def _check_tmp(run: _Run, idle: set[str] | None) -> None:
    """Temp leftovers: with the exclusive lock (repair) every unlocked entry; else see `_idle_tmp_entries`."""

    s = run.store
    cutoff = time.time() - STALE_TMP_AGE_S
    for e in _tmp_entries(s):
        if _flocked(e):
            continue
        if not run.repair and (idle is None or e.path not in idle):
            try:
                if max(e.stat(follow_symlinks=False).st_mtime, 0) >= cutoff:
                    continue
            except FileNotFoundError:
                continue
        repaired = False
        kind = "directory" if _is_dir(e) else "file"
        if run.repair:
            try:  # through the directory's fd: a tmp/ swapped for a symlink cannot redirect it
                _remove_tmp_entry(e)
                repaired = True
            except FileNotFoundError:
                repaired = True
            except OSError:
                repaired = False
        run.add("temp-leftover", s, e.path, f"{kind} left by a writer that is gone", repaired=repaired,
                note="removed" if repaired else "fsck --repair removes it")


def _remove_tmp_entry(e: os.DirEntry) -> None:
    from flatmount.safepath import open_dir_nofollow, remove_tree_at

    dfd = open_dir_nofollow(os.path.dirname(e.path), "temp directory")
    if dfd is None:
        return
    try:
        remove_tree_at(dfd, e.name)
    finally:
        os.close(dfd)


def _is_dir(e: os.DirEntry) -> bool:
    try:
        return stat.S_ISDIR(e.stat(follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _check_unverified(run: _Run, s: Store) -> None:
    """unverified-layer notices (see the module docstring)."""
    from flatmount.store.records import layer_is_unverified

    for lid, parent, diff_id in s.connect().execute("SELECT id, parent, diff_id FROM layers"):
        if layer_is_unverified(lid, parent, diff_id):
            run.add("unverified-layer", s, lid,
                    f"content not verified against its diff_id {diff_id} (imported from a "
                    "containers-storage layer without matching tar-split data)",
                    note="a digest-verified pull of an image with this layer imports it verified")
