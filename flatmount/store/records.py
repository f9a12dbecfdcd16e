"""What a store records: the SQLite schema and its migrations, the record types read from it, and the
rules that name records (layer chain ids, timestamps)."""

from __future__ import annotations

import time

from flatmount.record import field, record
from flatmount.store.reftable import migrate_to_compact

SCHEMA_VERSION = 3

SCHEMA = """
CREATE TABLE IF NOT EXISTS layers(id TEXT PRIMARY KEY, parent TEXT, diff_id TEXT NOT NULL,
  compressed_digest TEXT, compressed_size INTEGER, diff_size INTEGER, created TEXT, inodes INTEGER);
CREATE TABLE IF NOT EXISTS images(id TEXT PRIMARY KEY, top_layer TEXT, config BLOB, manifest BLOB,
  created TEXT);
CREATE TABLE IF NOT EXISTS names(name TEXT PRIMARY KEY, image_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS flat_images(chain_key TEXT PRIMARY KEY, digest TEXT NOT NULL, created REAL);
CREATE TABLE IF NOT EXISTS refs(owner TEXT NOT NULL, object TEXT NOT NULL, PRIMARY KEY(owner, object))
  WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS refs_object ON refs(object);
CREATE TABLE IF NOT EXISTS leases(id TEXT PRIMARY KEY, image_digest TEXT NOT NULL, image_ref TEXT,
  merged TEXT NOT NULL, pid INTEGER, boot_id TEXT, created REAL);
"""

# before every write, SQLite's quick_check of these (small) tables; gc, rmi and fsck check the whole DB
WRITE_CHECK_TABLES = ("layers", "images", "names", "flat_images", "leases")
DB_ADVICE = ("; the store's records are damaged: run `flatmount fsck` and restore flatmount.db from a "
             "backup (nothing was changed)")

# a step is SQL text or a function of the connection; a DB is brought up to date in one transaction.
# version 2: each layer's image digest (sha256 of layers/<id>.erofs, checked by flatten and fsck; NULL
# for layers recorded before), and `verified`: files whose sha256 was checked, with their identity then
# (flatmount.store.integrity), so a mount need not hash an image again until it is rewritten;
# version 3: refs rows as (owner id, 32-byte digest), a quarter of the pages (flatmount.store.reftable)
MIGRATIONS = {2: ("ALTER TABLE layers ADD COLUMN image_digest TEXT",
                  "CREATE TABLE IF NOT EXISTS verified(path TEXT PRIMARY KEY, digest TEXT NOT NULL, "
                  "dev INTEGER, ino INTEGER, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER)"),
              3: (migrate_to_compact,)}


@record
class LayerRecord:
    """One layer as recorded in some store; digests are `sha256:<hex>` strings, ids bare hex."""

    id: str
    parent: str | None
    diff_id: str
    compressed_digest: str | None
    compressed_size: int | None
    diff_size: int | None
    created: str | None
    store_root: str
    image_path: str
    inodes: int | None = field(default=None, compare=False)
    image_digest: str | None = field(default=None, compare=False)   # sha256 hex of image_path's bytes


@record
class ImageRecord:
    """One image; `id` is its config digest hex, `names` sorted, `config` the parsed config JSON."""

    id: str
    names: tuple[str, ...]
    top_layer: str | None
    created: str | None
    store_root: str
    config: dict | None


@record
class RemovedImage:
    """What `Store.remove_image` did: names untagged, and the image/layers deleted (if any)."""

    ref: str
    image_id: str
    untagged: tuple[str, ...]
    deleted: bool
    layers_removed: tuple[str, ...]


def chain_id(parent: str | None, diff_id: str) -> str:
    """Layer id (containers/storage rule): base = diff_id hex; child = sha256(parent + "+" + hex)."""
    import hashlib

    hexpart = diff_id.split(":", 1)[1] if ":" in diff_id else diff_id
    if parent is None:
        return hexpart
    return hashlib.sha256(f"{parent}+{hexpart}".encode("ascii")).hexdigest()


def unverified_chain_id(parent: str | None, diff_id: str) -> str:
    """Id of a layer whose content was NOT proven to hash to `diff_id` (a c/storage layer without
    usable tar-split data): never the id a verified import of that diff_id uses, so no digest-checked
    pull can take it for the real layer (flatmount.sources.cstorage.pull_cstorage)."""
    import hashlib

    return hashlib.sha256(f"flatmount-unverified+{chain_id(parent, diff_id)}".encode("ascii")).hexdigest()


def layer_is_unverified(layer_id: str, parent: str | None, diff_id: str) -> bool:
    """True for a layer recorded under `unverified_chain_id` (its own content; not its parents')."""
    return layer_id != chain_id(parent, diff_id) and layer_id == unverified_chain_id(parent, diff_id)


def now_iso() -> str:
    """UTC timestamp as recorded in `created` columns (RFC 3339, seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
