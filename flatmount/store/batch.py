"""One all-or-nothing import into the primary store (`ImportBatch`), and what a pull returns.

Every layer source (flatmount.sources) stages its layers through an ImportBatch; flatmount.pull
picks the source.  How an import stays all-or-nothing: file content goes straight into the
primary's object store (`ObjectStore.sync()` once per layer), each layer's EROFS image into a private
staging directory `<root>/tmp/import-*` (flock'ed while alive; fsynced).  Only when every digest
checked out are, inside ONE transaction, the layer images renamed to `layers/<id>.erofs` and the
layer, refs, image and name rows inserted.  The shared GC lock is held from before the first object
put to the commit.  A failed import removes the objects it created, unless a refs row, a live mount
or an additional store needs them by then (see `ImportBatch._rollback_objects`).
"""

from __future__ import annotations

import _thread
import contextlib
import hashlib
import json
import os
import sys

from flatmount.atomic import fsync_dir, make_temp_dir
from flatmount.errors import LayerError, StoreError
from flatmount.image.tree import S_IFMT, S_IFREG
from flatmount.record import field, record
from flatmount.store import reftable
from flatmount.store.locks import hold
from flatmount.store.names import normalise_name
from flatmount.store.records import chain_id, layer_is_unverified, now_iso, unverified_chain_id
from objects import paths as objpaths
from objects.paths import is_hex, is_sha256_digest, object_path

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: CLI start-up, see objects/lazy.py)

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable, Iterable, Iterator
    from typing import Any

    from flatmount.image.tree import Inode
    from flatmount.store.core import Store
    from flatmount.store.records import ImageRecord, LayerRecord
    from objects import ObjectStore

_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "ppc64le": "ppc64le",
           "s390x": "s390x", "riscv64": "riscv64"}


@record
class PullResult:
    """What a pull did: the image, and which of its layers were imported or already present."""

    image: ImageRecord
    imported: tuple[str, ...]
    present: tuple[str, ...]
    bytes_read: int = 0
    entries: int = 0


# --- staging + commit ----------------------------------------------------------------------------

class _PendingLayer:
    """A layer staged by `add_layer`, recorded by `commit` (a plain class: its threads are taken as
    they finish)."""

    __slots__ = ("id", "parent", "diff_id", "diff_size", "compressed_digest", "compressed_size", "created",
                 "inodes", "refs", "image_tmp", "tree_tmp", "image_digest", "unproven", "finishing", "caching")

    def __init__(self, id: str, parent: str | None, diff_id: str, diff_size: int | None,  # noqa: A002
                 compressed_digest: str | None, compressed_size: int | None, created: str, inodes: int,
                 refs: bytes, image_tmp: str, tree_tmp: str | None = None, image_digest: str | None = None,
                 unproven: frozenset[str] = frozenset(), finishing: _Background | None = None,
                 caching: _Background | None = None) -> None:
        self.id, self.parent, self.diff_id, self.diff_size = id, parent, diff_id, diff_size
        self.compressed_digest, self.compressed_size = compressed_digest, compressed_size
        self.created, self.inodes = created, inodes
        self.refs = refs                    # the digests of the objects it references, sorted, as `reftable.insert` takes them
        self.image_tmp = image_tmp
        self.tree_tmp = tree_tmp            # its tree cache (flatmount.store.paths.layer_cache_path), if written
        self.image_digest = image_digest    # sha256 hex of the layer image (recorded: flatten and fsck check it)
        self.unproven = unproven            # the objects not known to be stored by this batch
        self.finishing = finishing          # the image's fsync (`files_ready`)
        self.caching = caching              # the thread writing its tree cache (`cache_ready`)

    def files_ready(self) -> None:
        """Wait until the image is fsynced; raises what the fsync raised."""
        finishing, self.finishing = self.finishing, None
        if finishing is not None:
            finishing.join()

    def cache_ready(self) -> None:
        """Wait until the tree cache is written (`tree_tmp` then says where, None if it could not be)."""
        caching, self.caching = self.caching, None
        if caching is not None:
            self.tree_tmp = caching.join()


@record
class _PendingImage:
    id: str
    top_layer: str | None
    config: bytes | None
    manifest: bytes | None
    names: list[str] = field(default_factory=list)
    created: str | None = None


def tree_objects(tree: Inode) -> frozenset[str]:
    """Object paths (`XX/<62 hex>`) the tree's external files reference."""
    return _tree_refs(tree)[0]


def _tree_refs(tree: Inode) -> tuple[frozenset[str], int]:
    """(`tree_objects`, `count_inodes`) in one walk, with one path per distinct digest (not per
    file, through the generic walk and properties): an import of many small files needs both at
    its end, while nothing else can go on."""
    paths, digests, count = _tree_walk(tree)
    return frozenset(paths.union(map(object_path, digests))), count


def _tree_walk(tree: Inode) -> tuple[set[str], set[bytes], int]:
    """The walk of `_tree_refs`: (object paths the tree names, digests of the other external files,
    inode count), each checked to be well formed; `add_layer` keeps the digests apart, so that
    `commit` need check only those its batch did not store itself."""
    paths: set[str] = set()
    digests: set[bytes] = set()
    seen = {id(tree)}  # every distinct inode (a hardlink group once): the count
    stack = [tree]
    while stack:
        for node in stack.pop().entries.values():  # type: ignore[union-attr]
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.entries is not None:
                if node.entries:
                    stack.append(node)
            elif node.content is None and node.mode & S_IFMT == S_IFREG:
                if node.payload is not None:
                    paths.add(node.payload)
                elif node.digest is not None:
                    digests.add(node.digest)
    for p in paths:
        if not objpaths.OBJPATH_RE.fullmatch(p):
            raise LayerError(f"file references a malformed object path {p!r}")
    for d in digests:
        if len(d) != 32:  # (the hex of 32 bytes is exactly what OBJPATH_RE takes)
            raise LayerError(f"file references a malformed object path {object_path(d)!r}")
    return paths, digests, len(seen)


class _RecordingObjects:
    """The primary's ObjectStore, remembering every digest put through it (for rollback).

    `stored`: those known to be in the store (put returned, or their bulk writer closed cleanly).
    """

    def __init__(self, objects: ObjectStore):
        import threading

        self._objects = objects
        self.digests: set[bytes] = set()
        self.stored: set[bytes] = set()
        self.created = objects.watch_created()  # objects that did not exist before a put created them
        self._closing: list[_RecordingBulk] = []  # bulk writers closed, their helpers maybe still writing
        self._closing_lock = threading.Lock()

    def finish_bulks(self) -> None:
        """Wait for the bulk writers closed so far (`_RecordingBulk.close` does not): their objects
        stored, noted for `sync()` and recorded as stored; raises the first error one reported."""
        with self._closing_lock:
            pending, self._closing = self._closing, []
        error: BaseException | None = None
        for bulk in pending:
            try:
                bulk._finish()
            except BaseException as e:  # noqa: BLE001 - the others are finished (or aborted) first
                error = error or e
        if error is not None:
            raise error

    def abort_bulks(self) -> None:
        """Stop the helpers of the bulk writers closed so far, once they stored what they were sent
        (a failed import: what they created is then known, for the rollback)."""
        with self._closing_lock:
            pending, self._closing = self._closing, []
        for bulk in pending:
            bulk.abort()

    def unwatch(self) -> None:
        self._objects.unwatch_created(self.created)

    def _record(self, d: bytes) -> bytes:
        self.digests.add(d)
        self.stored.add(d)
        return d

    def put(self, stream, expected=None, size=None) -> bytes:
        return self._record(self._objects.put(stream, expected, size))

    def put_async(self, stream, expected=None, size=None) -> _RecordedPut:
        return _RecordedPut(self._objects.put_async(stream, expected, size), self)

    def put_bytes(self, data, expected=None) -> bytes:
        return self._record(self._objects.put_bytes(data, expected))

    def put_file(self, path, expected=None) -> bytes:
        return self._record(self._objects.put_file(path, expected))

    def bulk(self, helper=None, many=False) -> _RecordingBulk:
        return _RecordingBulk(self._objects.bulk(helper, many), self)

    def __getattr__(self, name: str):
        return getattr(self._objects, name)


class _RecordedPut:
    """A pending put of `_RecordingObjects`: its digest is recorded when it is waited for."""

    def __init__(self, pending, recording: _RecordingObjects):
        self._pending = pending
        self._recording = recording

    def result(self) -> bytes:
        return self._recording._record(self._pending.result())


class _RecordingBulk:
    """An ObjectStore bulk writer whose digests are recorded for rollback at once, as stored at close."""

    def __init__(self, bulk, recording: _RecordingObjects):
        self._bulk = bulk
        self._recording = recording
        self._pending: list[bytes] = []

    def put_bytes(self, data) -> bytes:
        d = self._bulk.put_bytes(data)
        self._recording.digests.add(d)
        self._pending.append(d)
        return d

    def put_many(self, datas) -> list[bytes]:
        ds = self._bulk.put_many(datas)
        self._recording.digests.update(ds)
        self._pending += ds
        return ds

    def close(self) -> None:
        """Closed without waiting: its helpers finish storing what they were sent while the import
        goes on (e.g. builds the layer image); the batch waits for them before its objects' sync
        (`ImportBatch.add_layer`), at commit, or stops them on failure."""
        self._bulk.end_input()
        with self._recording._closing_lock:
            self._recording._closing.append(self)

    def _finish(self) -> None:
        self._bulk.close()
        self._recording.stored.update(self._pending)
        self._pending = []

    def abort(self) -> None:
        self._bulk.abort()

    def __enter__(self) -> _RecordingBulk:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ImportBatch:
    """One all-or-nothing import into the primary store (see module docstring).

        with ImportBatch(store) as batch:
            tree = ...build, putting content into batch.objects...
            lid = batch.add_layer(tree, parent=None, diff_id="sha256:...")
            batch.set_image(image_id, lid, config=cfg_bytes, names=["foo"])
            record = batch.commit()

    `batch.objects` is the primary's object store (puts are recorded for rollback).  Every object a
    layer references must be in the primary's object store at commit, else StoreError.  Leaving the
    `with` block without `commit()` discards everything and rolls back the objects it created.
    """

    def __init__(self, store: Store):
        self.store = store
        self._layers: list[_PendingLayer] = []
        self._image: _PendingImage | None = None
        self._staging: str | None = None
        self._staging_fd = -1
        self._objects: _RecordingObjects | None = None
        self._lock: contextlib.ExitStack | None = None
        self._fanout_before: set[str] = set()
        self.committed = False

    def __enter__(self) -> ImportBatch:
        store = self.store
        store.ensure_writable()
        stack = contextlib.ExitStack()
        stack.enter_context(store.gc_lock(shared=True))
        try:
            self._fanout_before = set(os.listdir(store.objects_str))
            os.makedirs(store.tmp_str, mode=0o700, exist_ok=True)
            self._staging = make_temp_dir(store.tmp_str, f"import-{os.getpid()}-")
            self._staging_fd = os.open(self._staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            # blocking: a cleaner (clean_tmp, fsck) may be probing the new dir this very moment,
            # and holds the lock only for that probe
            hold(self._staging_fd)
        except BaseException:
            stack.close()
            self._cleanup()
            raise
        self._lock = stack
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._objects is not None and not self.committed:
                # still under the shared GC lock: no helper writes once it is released, and what
                # they created is known for the rollback
                self._objects.abort_bulks()
        finally:
            self._exit()

    def _exit(self) -> None:
        for p in self._layers:  # (committed: all are ready; else none may write into staging now)
            with contextlib.suppress(Exception):
                p.cache_ready()
            with contextlib.suppress(Exception):
                p.files_ready()
        try:
            self._cleanup()
        finally:
            if self._lock is not None:
                self._lock.close()
                self._lock = None
            if self._objects is not None:
                try:
                    if not self.committed:
                        self._rollback_objects(self._objects.digests & self._objects.created)
                finally:
                    self._objects.unwatch()

    def _cleanup(self) -> None:
        if self._staging is not None:
            import shutil

            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        if self._staging_fd >= 0:
            os.close(self._staging_fd)
            self._staging_fd = -1

    def _rollback_objects(self, digests: set[bytes]) -> None:
        """Remove the objects this failed import created (`digests`: put by it AND created by its puts,
        never content it found already stored), except those something needs by now: a refs row, a
        live mount's image (`flatmount.store.refs.leased_beyond_records`), an additional store that lacks
        it.  Only with the exclusive GC lock free right now: another import or flatten between its
        puts and its commit may rely on them (they are then left to `gc`)."""
        if not digests:
            return
        store = self.store
        with store._try_exclusive_gc() as idle:
            if not idle:
                return  # another writer is between puts and commit: leave our garbage to gc
            from flatmount.store.refs import leased_beyond_records, needed_by_additional

            db = store.connect()
            rels = sorted(map(object_path, digests))
            keep = (reftable.referenced_among(db, rels) | leased_beyond_records(store, db)
                    | needed_by_additional(store, rels))
            for rel in rels:
                if rel not in keep:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(store.objects_str, rel))
            for xx in {rel[:2] for rel in rels} - self._fanout_before:
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(store.objects_str, xx))

    @property
    def staging(self) -> str:
        if self._staging is None:
            raise StoreError("ImportBatch used outside its `with` block")
        return self._staging

    @property
    def objects(self) -> ObjectStore:
        """The primary's object store: put layer content here (durable at `add_layer`)."""
        if self._objects is None:
            self.staging  # noqa: B018 - only inside the `with` block (the GC lock is held)
            self._objects = _RecordingObjects(self.store.objects)
        return self._objects  # type: ignore[return-value]

    def keep_objects(self, paths: Iterable[str]) -> None:
        """Objects (`XX/<62 hex>`) a failed batch must not roll back: a resumable pull reuses them
        (unreferenced, they are gc's after its grace period)."""
        if self._objects is None:
            return
        keep = {bytes.fromhex(p.replace("/", "")) for p in paths}
        self._objects.digests -= keep

    def has_layer(self, layer_id: str) -> bool:
        """Staged in this batch, or recorded in some store with its image and objects intact: a
        recorded layer that lost its image or an object (flatmount.store.integrity.layer_damage) counts as
        absent, so the pull imports it again, which puts the missing objects back and rewrites its
        image (`_record`)."""
        if any(p.id == layer_id for p in self._layers):
            return True
        if not self.store.has_layer(layer_id):
            return False
        from flatmount.store.integrity import layer_damage

        return layer_damage(self.store, self.store.layer(layer_id)) is None

    def add_layer(self, tree: Inode, *, parent: str | None, diff_id: str, layer_id: str | None = None,
                  compressed_digest: str | None = None, compressed_size: int | None = None,
                  diff_size: int | None = None, created: str | None = None, verified: bool = True) -> str:
        """Stage a layer: its EROFS image written and fsynced, the objects synced; returns its id.

        `verified=False`: `tree` was not proven to hash to `diff_id`; it is staged under
        `unverified_chain_id`, which no verified import ever reuses."""
        if not is_sha256_digest(diff_id):
            raise LayerError(f"diff_id {diff_id!r} is not sha256:<64 hex>")
        lid = chain_id(parent, diff_id) if verified else unverified_chain_id(parent, diff_id)
        if layer_id is not None and layer_id != lid:
            raise LayerError(f"layer id {layer_id} does not follow from parent {parent} and diff_id "
                             f"{diff_id} (expected {lid})")
        tmp = os.path.join(self.staging, f"layer-{lid}.erofs")
        for p in self._layers:  # at most one tree cache is being written (the last layer's)
            p.cache_ready()
            if p.id == lid:  # staged again: the earlier staging's files are done with first
                p.files_ready()
        # the objects' sync (mostly waiting for the disk), after the bulk helpers finished writing,
        # runs while this thread builds the image and the object list (CPU), which do not touch the
        # object store
        syncing = _Background(self._finish_objects)
        finishing = caching = None
        try:
            image_digest, finishing, cache, (paths, digests, count) = self._stage_files(tree, lid, tmp)
            # (the refs rows' digests at once, in one blob: 1.6 MB, not the sets of a layer of
            # 50,000 files, which commit would hold while it builds the tree cache)
            refs = _refs_blob(paths, digests)
            # the tree cache (CPU) is built while this thread waits for the sync and, if that takes
            # less time, while commit's SQLite inserts run without the GIL
            caching = _Background(cache, quick_gil=True)
            syncing.join()  # (raises what the sync raised)
        except BaseException:
            for thread in (syncing, finishing, caching):  # (this error is the one to report)
                if thread is not None:
                    with contextlib.suppress(BaseException):
                        thread.join()
            raise
        # what this batch stored (and only grows) needs no check at commit: a set difference now,
        # not one lookup per object then, when the other core has nothing to do
        ours = self._objects.stored if self._objects is not None else set()
        unproven = frozenset(paths.union(map(object_path, digests.difference(ours))))
        self._layers = [p for p in self._layers if p.id != lid]
        self._layers.append(_PendingLayer(lid, parent, diff_id, diff_size, compressed_digest,
                                          compressed_size, created or now_iso(), count,
                                          refs, tmp, None, image_digest, unproven, finishing, caching))
        return lid

    def _finish_objects(self) -> None:
        """The objects put so far stored (bulk writers finished) and synced."""
        if self._objects is not None:
            self._objects.finish_bulks()
        self.store.objects.sync()

    def _stage_files(self, tree: Inode, lid: str, tmp: str) -> tuple[
            str, _Background, Callable[[], str | None], tuple[set[str], set[bytes], int]]:
        """Write the layer image to staging: (image sha256 hex, the thread that fsyncs it, the call
        that writes its tree cache there (returns the cache's path, None if it could not), and
        `_tree_walk` of the tree).

        Why a thread and a call for later: the fsync waits for the disk while this one builds the
        object list (CPU); the tree cache (CPU) is built by a thread (`add_layer`) once the object
        list is made, which may run until commit's inserts.  So `tree` must not change until then
        (no importer changes a tree it staged)."""
        from flatmount.image.treecache import tree_cache_bytes
        from flatmount.image.writer import image_bytes

        data = image_bytes(tree)
        image_digest = hashlib.sha256(data).hexdigest()
        image_size = len(data)
        f = open(tmp, "wb")  # noqa: SIM115 - closed by the thread
        try:
            f.write(data)
            f.flush()
        except BaseException:
            f.close()
            raise
        finishing = _Background(lambda: _fsync_close(f))
        del data  # (peak memory of imports of many small files: not held while more is built)
        staging = self.staging

        def cache() -> str | None:
            """The tree cache: flatten then loads the layer several times faster than parsing the
            image; derived, so not fsynced (it is checked against the image at load)."""
            path: str | None = os.path.join(staging, f"layer-{lid}.tree")
            try:
                with open(path, "wb") as out:
                    out.write(tree_cache_bytes(tree, image_digest, image_size))
                os.chmod(path, 0o644)
            except (OSError, ValueError):
                path = None
            return path

        return image_digest, finishing, cache, _tree_walk(tree)

    def set_image(self, image_id: str, top_layer: str | None, *, config: dict | bytes | str | None = None,
                  manifest: bytes | str | None = None, names: Iterable[str] = (),
                  created: str | None = None) -> None:
        """The image to record with the layers (names normalised; they move from other images)."""
        image_id = image_id.removeprefix("sha256:")
        if not is_hex(image_id, 64):
            raise StoreError(f"image id {image_id!r} is not 64 hex digits")
        if isinstance(config, dict):
            config = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        elif isinstance(config, str):
            config = config.encode()
        if isinstance(manifest, str):
            manifest = manifest.encode()
        self._image = _PendingImage(image_id, top_layer, config, manifest,
                                    [normalise_name(n) for n in names], created)

    def commit(self) -> ImageRecord | None:
        """Record everything staged in one transaction; returns the image record (if one was set)."""
        store = self.store
        objdir = store.objects_str
        if self._objects is not None:
            self._objects.finish_bulks()  # (add_layer did, unless content was put after it)
        store.require_sound_db("import into it")  # (whole DB: an import writes refs rows)
        # objects this batch stored are there (stored under the shared GC lock): check the others
        ours = self._objects.stored if self._objects is not None else set()
        for p in self._layers:
            for o in p.unproven:
                if bytes.fromhex(o[:2] + o[3:]) not in ours and not os.path.isfile(f"{objdir}/{o}"):
                    raise StoreError(f"layer {p.id} references object {o}, which is not in {objdir}")
        renamed: list[str] = []
        try:
            with store.transaction() as db:
                self._record(db, renamed)
        except BaseException:
            for path in renamed:  # no record was committed for them (and none could appear meanwhile)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            raise
        self.committed = True
        img = self._image
        return store.resolve_image(img.id) if img is not None else None

    def _record(self, db, renamed: list[str]) -> None:
        """The inserts of `commit` (inside its transaction); layer images renamed into place first."""
        from flatmount.store.paths import layer_cache_path

        store = self.store
        in_batch = {p.id for p in self._layers}
        for p in self._layers:
            row = db.execute("SELECT image_digest FROM layers WHERE id = ?", (p.id,)).fetchone()
            if row is not None:  # recorded already: by a concurrent import, or a layer being repaired
                p.cache_ready()
                p.files_ready()
                self._repair_layer(db, p, row[0])
                continue
            if p.parent is not None and p.parent not in in_batch and not self._recorded(db, p.parent):
                raise StoreError(f"parent layer {p.parent} of layer {p.id} is in no store "
                                 "(removed meanwhile?)")
            # (its tree cache, if still being written, goes on while SQLite inserts without the GIL)
            reftable.insert(db, "layer:" + p.id, (p.refs,))
            p.cache_ready()
            p.files_ready()
            os.replace(p.image_tmp, store.layer_image_path(p.id))
            renamed.append(store.layer_image_path(p.id))
            if p.tree_tmp is not None:  # after the image: a cache without its image is gc's garbage
                cache = layer_cache_path(store.layer_image_path(p.id))
                with contextlib.suppress(OSError):
                    os.replace(p.tree_tmp, cache)
                    renamed.append(cache)
            db.execute("INSERT INTO layers(id, parent, diff_id, compressed_digest, compressed_size, "
                       "diff_size, created, inodes, image_digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (p.id, p.parent, p.diff_id, p.compressed_digest, p.compressed_size,
                        p.diff_size, p.created, p.inodes, p.image_digest))
        if renamed:
            fsync_dir(store.layers_str)
        img = self._image
        if img is not None:
            top = img.top_layer
            if top is not None and top not in in_batch and not self._recorded(db, top):
                raise StoreError(f"top layer {top} of image {img.id[:12]} is in no store")
            db.execute("INSERT OR IGNORE INTO images(id, top_layer, config, manifest, created) "
                       "VALUES (?, ?, ?, ?, ?)",
                       (img.id, top, img.config, img.manifest, img.created or now_iso()))
            self._prefer_verified(db, img)
            for n in img.names:
                db.execute("INSERT OR REPLACE INTO names(name, image_id) VALUES (?, ?)", (n, img.id))

    def _prefer_verified(self, db, img: _PendingImage) -> None:
        """The verified record wins: an image already recorded over a chain with an unverified layer
        (flatmount.sources.cstorage) is pointed at this import's chain if that one is fully verified."""
        row = db.execute("SELECT top_layer FROM images WHERE id = ?", (img.id,)).fetchone()
        if row is None or row[0] == img.top_layer or img.top_layer is None:
            return
        if self._chain_verified(db, img.top_layer) and not self._chain_verified(db, row[0]):
            db.execute("UPDATE images SET top_layer = ?, config = ?, manifest = ? WHERE id = ?",
                       (img.top_layer, img.config, img.manifest, img.id))

    def _chain_verified(self, db, top: str | None) -> bool:
        """No layer of the chain ending in `top` is recorded as unverified (an unknown layer counts
        as unverified)."""

        lid, seen = top, set()
        while lid is not None and lid not in seen:
            seen.add(lid)
            row = db.execute("SELECT parent, diff_id FROM layers WHERE id = ?", (lid,)).fetchone()
            if row is None:
                rec = next((r for r in (s.own_layer(lid) for s in self.store.additional) if r), None)
                if rec is None:
                    return False
                row = (rec.parent, rec.diff_id)
            if layer_is_unverified(lid, row[0], row[1]):
                return False
            lid = row[0]
        return lid is None
    def _repair_layer(self, db, p: _PendingLayer, recorded: str | None) -> None:
        """A re-imported layer that is recorded already: if its image is missing or is not the one
        recorded, put the staged image (made from the verified source) in its place; its refs rows
        gain what the new image references.  An intact image is left alone (a concurrent import)."""
        from flatmount.store.integrity import read_file
        from flatmount.store.paths import layer_cache_path

        store = self.store
        path = store.layer_image_path(p.id)
        try:
            actual: str | None = hashlib.sha256(read_file(path)[0]).hexdigest()
        except (OSError, LayerError, StoreError, ValueError):
            actual = None
        if actual is not None and actual == (recorded or p.image_digest):
            if recorded is None:  # recorded before digests were: now proven by the verified source
                db.execute("UPDATE layers SET image_digest = ? WHERE id = ?", (actual, p.id))
            return
        os.replace(p.image_tmp, path)
        cache = layer_cache_path(path)
        if p.tree_tmp is not None:
            with contextlib.suppress(OSError):
                os.replace(p.tree_tmp, cache)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(cache)
        fsync_dir(store.layers_str)
        db.execute("UPDATE layers SET image_digest = ? WHERE id = ?", (p.image_digest, p.id))
        reftable.insert(db, "layer:" + p.id, (p.refs,))

    def _recorded(self, db, layer_id: str) -> bool:
        if db.execute("SELECT 1 FROM layers WHERE id = ?", (layer_id,)).fetchone():
            return True
        return any(s.own_layer(layer_id) is not None for s in self.store.additional)


def _refs_blob(paths: set[str], digests: set[bytes]) -> bytes:
    """The digests of the object paths `paths` and `digests` (`_tree_walk`'s), sorted and joined, as
    `reftable.insert` takes them: 32 bytes an object, where the text of schema 2 was a JSON array
    of 68 an object, built a path at a time."""
    return b"".join(sorted(digests.union(map(reftable.digest_of, paths)) if paths else digests))


_HANDOFF_LOCK = _thread.allocate_lock()
_handoff = [0.0, 0]  # the interval to restore, how many threads are in `_quick_gil_handoff`


@contextlib.contextmanager
def _quick_gil_handoff() -> Iterator[None]:
    """A short switch interval while a thread of the import runs Python beside the importing one:
    when that one returns from a wait or an SQLite statement (both release the GIL), winning the
    GIL back took up to the default 5 ms each time (a layer's refs rows then took 0.06-0.08 s of
    commit instead of 0.05-0.06).  The first thread in sets it, the last one out restores it."""
    with _HANDOFF_LOCK:
        if _handoff[1] == 0:
            _handoff[0] = sys.getswitchinterval()
            sys.setswitchinterval(min(_handoff[0], 0.0002))
        _handoff[1] += 1
    try:
        yield
    finally:
        with _HANDOFF_LOCK:
            _handoff[1] -= 1
            if _handoff[1] == 0:
                sys.setswitchinterval(_handoff[0])


class _Background:
    """`fn()` in a thread of its own; `join()` waits for it and returns what it returned, or raises
    what it raised.  `quick_gil`: under `_quick_gil_handoff` while it runs (Python work beside the
    importing thread's)."""

    def __init__(self, fn: Callable[[], Any], quick_gil: bool = False) -> None:
        import threading

        self._error: BaseException | None = None
        self._result: Any = None
        self._fn = fn
        self._quick = quick_gil
        self._thread = threading.Thread(target=self._run, name="flatmount-stage", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self._quick:
                with _quick_gil_handoff():
                    self._result = self._fn()
            else:
                self._result = self._fn()
        except BaseException as e:  # noqa: BLE001 - handed to the joining thread
            self._error = e

    def join(self) -> Any:
        self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._result


def _fsync_close(f) -> None:
    """A staged file made durable (and 0644 whatever the umask), then closed."""
    try:
        os.fchmod(f.fileno(), 0o644)
        os.fsync(f.fileno())
    finally:
        f.close()


# --- configs for single-layer sources ------------------------------------------------------------

def host_architecture() -> str:
    m = os.uname().machine   # (what platform.machine() gives on POSIX, without its import: start-up)
    return _GOARCH.get(m, m)


# --- recording one layer or image (for importers and tools with a tree in hand) ---------------------

def record_layer(store: Store, layer_id: str, parent: str | None, diff_id: str, tree: Inode, *,
                 compressed_digest: str | None = None, compressed_size: int | None = None,
                 diff_size: int | None = None, created: str | None = None) -> LayerRecord:
    """Write the layer image and record the layer with its object refs, in one transaction.

    The objects `tree` references must already be durable in `store.objects` (put + sync); the
    caller should hold `store.gc_lock(shared=True)` since those puts.
    """
    with ImportBatch(store) as batch:
        batch.add_layer(tree, parent=parent, diff_id=diff_id, layer_id=layer_id,
                        compressed_digest=compressed_digest, compressed_size=compressed_size,
                        diff_size=diff_size, created=created)
        batch.commit()
    return store.layer(layer_id)


def record_image(store: Store, image_id: str, top_layer: str | None, *,
                 config: dict | bytes | str | None = None, manifest: bytes | str | None = None,
                 names: list[str] | tuple[str, ...] = (), created: str | None = None) -> ImageRecord:
    """Record an image (and its names, moved from other images if they had them) whose layers exist."""
    with ImportBatch(store) as batch:
        batch.set_image(image_id, top_layer, config=config, manifest=manifest, names=names,
                        created=created)
        return batch.commit()  # type: ignore[return-value]
