"""What a store references: the queries that say which objects something still needs (refs rows,
live leases, additional stores).  gc decides what to delete from them; pull's rollback and usage's
reports ask the same questions, so the rules live here once.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from flatmount.store.leases import read_leases
from flatmount.store.reftable import referenced_among

if TYPE_CHECKING:  # pragma: no cover
    import sqlite3

    from flatmount.store.core import Store


def has_db(store: Store) -> bool:
    """Whether the store has records at all (reading a missing DB would create it)."""
    return store.db_path.exists()


def kept_chain_keys(store: Store) -> set[str]:
    """Chain keys (top layer ids) of every recorded image: their flattened images stay cached."""
    return {img.top_layer for img in store.images() if img.top_layer}


def uncovered_leases(store: Store, db: sqlite3.Connection) -> set[str]:
    """Digests of live leased images whose chain no image record names (their layers' refs may be
    gone: what they reference is read from the image files)."""
    keys = kept_chain_keys(store)
    covered = {d for k, d in db.execute("SELECT chain_key, digest FROM flat_images") if k in keys}
    return {lease.image_digest for lease in read_leases(db) if lease.live} - covered


def leased_beyond_records(store: Store, db: sqlite3.Connection) -> set[str]:
    """Objects that only live mounts pin (`_uncovered_leases`).  gc keeps them; flatmount.usage
    counts them as referenced."""
    return leased_objects(store, uncovered_leases(store, db))


def leased_objects(store: Store, digests: set[str]) -> set[str]:
    """The objects the primary's image files of `digests` reference (leased images no record covers)."""
    out: set[str] = set()
    for digest in digests:
        path = store.root / "images" / f"{digest}.erofs"
        if path.exists():
            from flatmount.image.reader import collect_objects

            try:
                out |= collect_objects(path)
            except Exception:  # noqa: BLE001 - a corrupt leased image pins nothing we can read
                pass
    return out


def needed_by_additional(store: Store, candidates: list[str]) -> set[str]:
    """Candidates that some additional store references but does not hold itself."""
    if not candidates or not store.additional:
        return set()
    needed: set[str] = set()
    for ais in store.additional:
        if not has_db(ais):
            continue
        for obj in referenced_among(ais.connect(), candidates):
            if not os.path.isfile(os.path.join(ais.objects_dir, obj)):
                needed.add(obj)
    return needed
