"""Object-usage reports for operators: where the bytes of a store go, and what removing an image frees.

Why its own module: gc answers "what can go now", these reports answer "what would go if..." and
"who uses this object", from the same records (`refs` rows of every store) without changing anything.

Definitions (all byte counts are object file sizes, st_size):
- An image's objects are the union of the `layer:<id>` refs of every layer of its chain, each read
  from the DB of the store that records the layer (additional stores are read read-only).  Flattened
  images reference a subset of those, so they add nothing.
- An object's location is the first store whose object dir holds it (primary first, then additional
  stores in order, as a mount looks them up), or "missing".
- Per image: `total_bytes` = its objects; `unique_bytes` = objects in the PRIMARY store that no other
  image references: what `rmi` + `gc` would free (exactly so when each layer's objects live in the
  layer's store); `shared_bytes` = total - unique: objects another image references too, PLUS objects
  found only in an additional store (`additional_bytes`, never freeable from here); missing objects
  count in neither.
- Store totals: `objects`/`stored_bytes` = everything in the primary object dir;
  `referenced_objects`/`referenced_bytes` = distinct objects any image references (any store);
  `logical_bytes` = sum over images of `total_bytes` (an object counted once per image using it);
  `dedup_ratio` = logical_bytes / referenced_bytes (1.0 = nothing shared);
  `unreferenced_objects`/`unreferenced_bytes` = primary objects no refs row of the primary names
  and no live mount pins (a mounted image whose record was removed)
  (what gc removes once they are older than its grace period).
- `share`: for each pair of images, the objects (and bytes) both reference.

Reports hold the shared GC lock while they read, so a concurrent gc cannot make objects vanish
half-way; imports and flatten may run meanwhile (their objects then show as unreferenced).
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from flatmount.errors import FlatmountError, NotFoundError, StoreError
from flatmount.progress import EVERY, step
from flatmount.record import field, record
from flatmount.store import reftable
from flatmount.store.leases import read_leases
from flatmount.store.locks import store_lock
from flatmount.store.paths import scan_objects
from flatmount.store.refs import has_db, leased_beyond_records
from objects import paths as objpaths
from objects.paths import is_hex, object_path_hex

if TYPE_CHECKING:  # pragma: no cover
    from flatmount.store.core import Store
    from flatmount.store.records import ImageRecord

PRIMARY, ADDITIONAL, MISSING = "primary", "additional", "missing"


# --- result types --------------------------------------------------------------------------------

@record
class ImageUsage:
    """One image's bytes; see the module docstring for unique/shared/additional."""

    id: str
    names: tuple[str, ...]
    store_root: str
    layers: int
    objects: int
    total_bytes: int
    unique_objects: int
    unique_bytes: int          # primary-store objects no other image uses: freed by rmi + gc
    shared_objects: int
    shared_bytes: int          # used by another image too, or only in an additional store (not freeable)
    additional_bytes: int      # part of shared_bytes: objects found only in additional stores
    missing_objects: int       # referenced but in no store (see fsck)

    @property
    def label(self) -> str:
        return self.names[0] if self.names else self.id[:12]


@record
class UsageReport:
    store_root: str
    objects: int               # files in the primary object dir
    stored_bytes: int
    referenced_objects: int    # distinct objects used by images, whatever store holds them
    referenced_bytes: int
    logical_bytes: int         # sum over images of their total_bytes
    dedup_ratio: float         # logical_bytes / referenced_bytes
    unreferenced_objects: int  # primary objects no primary refs row names (gc candidates)
    unreferenced_bytes: int
    additional_objects: int    # referenced objects found only in additional stores
    additional_bytes: int
    missing_objects: int       # referenced objects in no store
    image_count: int
    layer_count: int
    images: tuple[ImageUsage, ...] = field(default=())


@record
class ObjectUser:
    kind: str                  # "layer", "flat", "image", "mount"
    id: str                    # layer id, flat image digest, image id, lease id
    store_root: str
    detail: str = ""           # image names, chain key, merged dir...


@record
class ObjectRefs:
    """Who uses one object (`refs DIGEST`)."""

    object: str
    size: int | None
    locations: tuple[str, ...]     # absolute paths, lookup order
    users: tuple[ObjectUser, ...]

    @property
    def referenced(self) -> bool:
        return bool(self.users)


@record
class TopObject:
    object: str
    size: int
    location: str
    images: int
    image_labels: tuple[str, ...]


@record
class TopReport:
    largest: tuple[TopObject, ...]
    most_shared: tuple[TopObject, ...]


@record
class SharePair:
    a: str
    b: str
    objects: int
    bytes: int


@record
class ShareReport:
    images: tuple[str, ...]        # labels, in the order of `usage().images`
    pairs: tuple[SharePair, ...]   # every pair (a before b), most bytes first


# --- the index every report is computed from -----------------------------------------------------

class _Index:
    """Per object: size, location and the set of images using it, as bitmasks over images/layers.

    Objects usually sit in one layer, so the distinct layer masks are few; each maps once to an image
    mask, and every report aggregates over (image mask, location) groups instead of objects.
    """

    def __init__(self, store: Store):
        self.store = store
        self.images: list[ImageRecord] = store.images()
        self.layer_index: dict[str, int] = {}
        self.layer_store: dict[str, Store] = {}
        image_layer_masks: list[int] = []
        self.chain_len: list[int] = []
        for img in self.images:
            mask = 0
            n = 0
            if img.top_layer:
                try:
                    chain = store.layer_chain(img.top_layer)
                except StoreError:
                    chain = []
                for rec in chain:
                    i = self.layer_index.setdefault(rec.id, len(self.layer_index))
                    self.layer_store.setdefault(rec.id, _store_of(store, rec.store_root))
                    mask |= 1 << i
                    n += 1
            image_layer_masks.append(mask)
            self.chain_len.append(n)
        self.image_layer_masks = image_layer_masks
        # object -> layer mask, from each layer's own store
        self.obj_layers: dict[str, int] = {}
        by_store: dict[int, list[str]] = {}
        for lid, s in self.layer_store.items():
            by_store.setdefault(id(s), []).append(lid)
        stores = {id(s): s for s in self.layer_store.values()}
        for sid, lids in by_store.items():
            s = stores[sid]
            if not has_db(s):
                continue
            wanted = {"layer:" + lid: 1 << self.layer_index[lid] for lid in lids}
            ol = self.obj_layers
            for owner, obj in reftable.rows_of(s.connect(), wanted):
                ol[obj] = ol.get(obj, 0) | wanted[owner]
        self._mask_cache: dict[int, int] = {}
        # sizes and locations
        self.primary_sizes: dict[str, int] = {}
        for i, (obj, path) in enumerate(scan_objects(store.objects_dir)):
            if not i % EVERY:
                step("objects: sizing", i)
            try:
                self.primary_sizes[obj] = os.lstat(path).st_size
            except FileNotFoundError:
                continue
        self.sizes: dict[str, int] = {}
        self.location: dict[str, str] = {}
        for obj in self.obj_layers:
            size = self.primary_sizes.get(obj)
            if size is not None:
                self.sizes[obj], self.location[obj] = size, PRIMARY
                continue
            for ais in store.additional:
                try:
                    size = os.stat(os.path.join(ais.objects_dir, obj)).st_size
                except OSError:
                    continue
                self.sizes[obj], self.location[obj] = size, ADDITIONAL
                break
            else:
                self.sizes[obj], self.location[obj] = 0, MISSING

    def image_mask(self, layer_mask: int) -> int:
        m = self._mask_cache.get(layer_mask)
        if m is None:
            m = 0
            for j, lm in enumerate(self.image_layer_masks):
                if lm & layer_mask:
                    m |= 1 << j
            self._mask_cache[layer_mask] = m
        return m

    def groups(self) -> dict[tuple[int, str], list[int]]:
        """(image mask, location) -> [objects, bytes] over every object some image uses."""
        out: dict[tuple[int, str], list[int]] = {}
        for obj, lm in self.obj_layers.items():
            im = self.image_mask(lm)
            if not im:
                continue
            g = out.setdefault((im, self.location[obj]), [0, 0])
            g[0] += 1
            g[1] += self.sizes[obj]
        return out

    def label(self, j: int) -> str:
        img = self.images[j]
        return img.names[0] if img.names else img.id[:12]


def _store_of(store: Store, root: str) -> Store:
    for s in (store, *store.additional):
        if str(s.root) == root:
            return s
    return store


def _bits(mask: int) -> Iterator[int]:
    j = 0
    while mask:
        if mask & 1:
            yield j
        mask >>= 1
        j += 1


def _index(store: Store) -> _Index:
    with store_lock(store, shared=True):
        return _Index(store)


# --- reports -------------------------------------------------------------------------------------

def usage(store: Store) -> UsageReport:
    """Store totals and per-image usage (see the module docstring for every definition)."""
    with store_lock(store, shared=True):
        idx = _Index(store)
        referenced_primary: set[str] = set()
        if has_db(store):
            db = store.connect()
            referenced_primary = reftable.referenced(db)
            referenced_primary |= leased_beyond_records(store, db)   # what gc keeps for live mounts
        layer_count = len(store.layers())
    groups = idx.groups()
    n = len(idx.images)
    acc = [[0] * 9 for _ in range(n)]  # objects, total, uobj, ubytes, sobj, sbytes, addl, missing, -
    ref_objects = ref_bytes = add_objects = add_bytes = missing = 0
    for (im, loc), (cnt, nbytes) in groups.items():
        if loc == MISSING:
            missing += cnt
        else:
            ref_objects += cnt
            ref_bytes += nbytes
        if loc == ADDITIONAL:
            add_objects += cnt
            add_bytes += nbytes
        single = im & (im - 1) == 0
        for j in _bits(im):
            a = acc[j]
            if loc == MISSING:
                a[7] += cnt
                continue
            a[0] += cnt
            a[1] += nbytes
            if single and loc == PRIMARY:
                a[2] += cnt
                a[3] += nbytes
            else:
                a[4] += cnt
                a[5] += nbytes
                if loc == ADDITIONAL:
                    a[6] += nbytes
    images = tuple(
        ImageUsage(img.id, img.names, img.store_root, idx.chain_len[j], a[0], a[1], a[2], a[3], a[4], a[5],
                   a[6], a[7])
        for j, (img, a) in enumerate(zip(idx.images, acc, strict=True)))
    logical = sum(i.total_bytes for i in images)
    unref = [o for o in idx.primary_sizes if o not in referenced_primary]
    return UsageReport(
        store_root=str(store.root),
        objects=len(idx.primary_sizes),
        stored_bytes=sum(idx.primary_sizes.values()),
        referenced_objects=ref_objects,
        referenced_bytes=ref_bytes,
        logical_bytes=logical,
        dedup_ratio=round(logical / ref_bytes, 4) if ref_bytes else 1.0,
        unreferenced_objects=len(unref),
        unreferenced_bytes=sum(idx.primary_sizes[o] for o in unref),
        additional_objects=add_objects,
        additional_bytes=add_bytes,
        missing_objects=missing,
        image_count=n,
        layer_count=layer_count,
        images=images,
    )


def share(store: Store) -> ShareReport:
    """Objects and bytes each pair of images has in common (missing objects excluded)."""
    idx = _index(store)
    n = len(idx.images)
    objs = [[0] * n for _ in range(n)]
    nbytes = [[0] * n for _ in range(n)]
    for (im, loc), (cnt, b) in idx.groups().items():
        if loc == MISSING or im & (im - 1) == 0:
            continue
        members = list(_bits(im))
        for x, i in enumerate(members):
            for k in members[x + 1:]:
                objs[i][k] += cnt
                nbytes[i][k] += b
    labels = tuple(idx.label(j) for j in range(n))
    pairs = [SharePair(labels[i], labels[k], objs[i][k], nbytes[i][k]) for i in range(n) for k in range(i + 1, n)]
    pairs.sort(key=lambda p: (-p.bytes, p.a, p.b))
    return ShareReport(labels, tuple(pairs))


def top(store: Store, n: int = 10) -> TopReport:
    """The `n` largest objects (primary store and any referenced) and the `n` most-shared ones."""
    idx = _index(store)
    everything = dict(idx.sizes)
    for obj, size in idx.primary_sizes.items():
        everything.setdefault(obj, size)

    def entry(obj: str) -> TopObject:
        im = idx.image_mask(idx.obj_layers.get(obj, 0))
        members = list(_bits(im))
        return TopObject(obj, everything[obj], idx.location.get(obj, PRIMARY), len(members),
                         tuple(idx.label(j) for j in members))

    largest = heapq.nlargest(n, everything, key=lambda o: (everything[o], o))
    shared = heapq.nlargest(
        n, (o for o in idx.obj_layers if idx.location[o] != MISSING),
        key=lambda o: (idx.image_mask(idx.obj_layers[o]).bit_count(), everything[o], o))
    return TopReport(tuple(entry(o) for o in largest), tuple(entry(o) for o in shared))


def parse_object(text: str) -> str:
    """`XX/<62 hex>` from a 64-hex digest (`sha256:` allowed) or any path ending in XX/<62 hex>."""
    t = text.strip().lower()
    digest = t.removeprefix("sha256:")
    if is_hex(digest, 64):
        return object_path_hex(digest)
    m = objpaths.OBJPATH_IN_TEXT_RE.search(t.rstrip("/"))
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    raise NotFoundError(f"{text!r} is not an object digest (64 hex digits) or object path (XX/<62 hex>)")


def _flat_users(store: Store, s: Store, obj: str, layer_hits: set[str]) -> list[ObjectUser]:
    """Flattened images of store `s` (and their mounts) built from a layer that uses `obj`: flat images
    hold no refs rows, their chain's layers do (flatmount.flatten).  A leased image whose row or whose
    chain's layers are gone (its image was removed while mounted) is read to see whether it
    references `obj`."""
    db = s.connect()
    users: list[ObjectUser] = []
    chains: dict[str, list[str]] = {}   # digest -> chain keys
    resolved: set[str] = set()   # digests whose chain's layers still exist (their refs rows answer)
    for key, digest in db.execute("SELECT chain_key, digest FROM flat_images ORDER BY chain_key"):
        try:
            chain = {rec.id for rec in store.layer_chain(key)}
        except StoreError:   # its layers went with a removed image: a live mount may still use it
            continue
        resolved.add(digest)
        if chain & layer_hits:
            chains.setdefault(digest, []).append(key)
    leases = read_leases(db)
    for lease in leases:
        d = lease.image_digest
        if d in resolved or d in chains:
            continue
        path = os.path.join(s.root, "images", d + ".erofs")
        if os.path.exists(path):
            from flatmount.image.reader import collect_objects

            try:
                if obj in collect_objects(path):
                    chains[d] = []
            except (FlatmountError, OSError):
                pass
    for digest, keys in sorted(chains.items()):
        users.append(ObjectUser("flat", digest, str(s.root), "chain " + ", ".join(keys) if keys else "no flat_images row"))
        for lease in leases:
            if lease.image_digest == digest:
                state = "live" if lease.live else f"stale: {lease.stale_reason}"
                users.append(ObjectUser("mount", lease.id, str(s.root), f"{lease.merged} ({state})"))
    return users


def object_refs(store: Store, text: str) -> ObjectRefs:
    """Which layers, flattened images, images and mounts use object `text` (digest or path)."""
    obj = parse_object(text)
    with store_lock(store, shared=True):
        locations = []
        size = None
        for s in (store, *store.additional):
            p = os.path.join(s.objects_dir, obj)
            try:
                st = os.stat(p)
            except OSError:
                continue
            locations.append(p)
            if size is None:
                size = st.st_size
        users: list[ObjectUser] = []
        layer_hits: set[str] = set()
        for s in (store, *store.additional):
            if not has_db(s):
                continue
            db = s.connect()
            for owner in reftable.owners_of(db, obj):
                kind, _, key = owner.partition(":")
                if kind == "layer":
                    layer_hits.add(key)
                    users.append(ObjectUser("layer", key, str(s.root)))
                elif kind != "flat":  # (`flat:` rows are left from earlier versions)
                    users.append(ObjectUser(kind or "unknown", key or owner, str(s.root)))
        for s in (store, *store.additional):
            if has_db(s):
                users += _flat_users(store, s, obj, layer_hits)
        if layer_hits:
            for img in store.images():
                if not img.top_layer:
                    continue
                try:
                    chain = {rec.id for rec in store.layer_chain(img.top_layer)}
                except StoreError:
                    continue
                if chain & layer_hits:
                    users.append(ObjectUser("image", img.id, img.store_root, ", ".join(img.names)))
    return ObjectRefs(obj, size, tuple(locations), tuple(users))
