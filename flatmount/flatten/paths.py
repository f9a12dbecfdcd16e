"""Where flatten's files are and which chain an image has: path helpers and store queries (kept
unchanged together, to move as one into the store's own path module)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from flatmount.store.core import Store


def flat_image_path(store_root: str | os.PathLike, digest: str) -> str:
    return os.path.join(os.fspath(store_root), "images", digest + ".erofs")


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
            path = flat_image_path(s.root, row[0])
            if os.path.exists(path):
                return path
    return None


def _is_sqlite_error(e: BaseException) -> bool:
    import sqlite3

    return isinstance(e, sqlite3.Error)


def _digest_of(path: str) -> str:
    return os.path.basename(path)[: -len(".erofs")]


TREE_SUFFIX = ".tree"     # images/<digest>.tree: the tree cache (see the module docstring)
INDEX_SUFFIX = ".index"   # images/<digest>.index: the diff index (flatmount.diff.ImageIndex)


def derived_paths(image_path: str | os.PathLike) -> tuple[str, str]:
    """The derived files of a flattened image `<root>/images/<digest>.erofs` (tree cache, diff index):
    remove them with the image.  They may be absent."""
    base = os.fspath(image_path)[: -len(".erofs")]
    return base + TREE_SUFFIX, base + INDEX_SUFFIX


def chain_of(store: Store, image) -> list:
    """The layer records (base first) of an ImageRecord; an image without layers is an error."""
    from flatmount.errors import StoreError

    if image.top_layer is None:
        raise StoreError(f"image {image.id[:12]} has no layers: there is nothing to flatten")
    return store.layer_chain(image.top_layer)


def layer_cache_path(layer_image: str | os.PathLike) -> str:
    """`layers/<id>.tree` beside `layers/<id>.erofs`: the layer's tree cache (same format as a flat
    image's, keyed by the sha256 of the layer image, which a layer's name is not)."""
    path = os.fspath(layer_image)
    return path[: -len(".erofs")] + TREE_SUFFIX if path.endswith(".erofs") else path + TREE_SUFFIX
