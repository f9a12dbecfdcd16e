"""Which cached flat image a chain has, in the primary or an additional store, and which layers an
image's chain holds (the paths themselves: flatmount.store.paths)."""

from __future__ import annotations

import os

from flatmount.store.paths import flat_image_path

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: CLI start-up, see objects/lazy.py)

if TYPE_CHECKING:  # pragma: no cover
    from flatmount.store.core import Store


def cached_flat_image(store: Store, chain_key: str) -> str | None:
    """Path of the cached image for `chain_key` in the primary or any additional store, if present."""
    for s in (store, *store.additional):
        try:
            row = s.connect().execute(
                "SELECT digest FROM flat_images WHERE chain_key = ?", (chain_key,)).fetchone()
        except Exception as e:  # a store whose DB is unreadable just has no cache for us
            if _is_sqlite_error(e):
                continue
            raise
        if row is not None:
            path = flat_image_path(s.root_str, row[0])
            if os.path.exists(path):
                return path
    return None


def _is_sqlite_error(e: BaseException) -> bool:
    from flatmount.store.sqlite import sqlite3

    return isinstance(e, sqlite3.Error)


def _digest_of(path: str) -> str:
    return os.path.basename(path)[: -len(".erofs")]


def chain_of(store: Store, ref: str) -> list:
    """The layer records (base first) of the image `ref` (name, id or id prefix) means; an image
    without layers is an error."""
    from flatmount.errors import StoreError

    image_id, top_layer = store.resolve_top_layer(ref)
    if top_layer is None:
        raise StoreError(f"image {image_id[:12]} has no layers: there is nothing to flatten")
    return store.layer_chain(top_layer)
