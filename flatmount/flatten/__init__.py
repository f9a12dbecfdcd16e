"""Flatten a layer chain into one tree (OCI changeset semantics) and cache its EROFS image in the store.

Tree semantics (`apply_layer`), applied layer by layer from the base up:
- a whiteout (char 0:0) removes the lower entry of that name; whiteouts never reach the result;
- an opaque directory (`trusted.overlay.opaque` = `y`) hides every lower child; the marker itself is
  dropped from the result;
- a directory meeting a lower directory replaces its attributes (mode, owner, mtime, all xattrs) and
  keeps the lower children not overridden;
- any other entry replaces whatever was there, whatever its type (file <-> dir <-> symlink ...);
- hardlinks are shared `Inode` objects: a group from one layer stays one group; when a later layer
  replaces one of its names, the other names keep the old inode.

Root directory rule.  The root is a directory like any other: the flattened root takes mode, owner,
mtime and xattrs from the topmost layer whose root carries attributes of its own.  A layer root that is
exactly the default an importer gives a tar without a `./` entry (0755, root:root, mtime 0, no xattrs
besides an opaque marker) carries none and keeps the attributes from below; with no layer carrying
any, the root is 0755 root:root with mtime 0.  This is the OCI rule (`./` is an ordinary directory
entry) and, for layers whose root always has attributes (c/storage `diff/` dirs, plain directories),
exactly what the kernel overlay of those layers shows.  We do not copy c/storage's tar-without-`./`
result (0555 with the `diff/` dir's creation time): it depends on when a layer was unpacked, so the
same chain would give different images in different stores.  The price: a `./` entry that explicitly
sets exactly those defaults on top of a lower root with other attributes is taken as absent.

Copy-on-write: input trees are never modified (layer trees and cached images may be shared); the
result shares every untouched subtree and every leaf inode with its inputs, and only directories that
a layer mentions are new objects.  Layer trees must not share inodes with each other (an object
reachable from two layers would become a hardlink).

Store side (`flatten_image`): a flattened image is cached per chain under its top layer id (layer ids
already encode the whole chain) in `flat_images`, in the primary or any additional store.  A chain
whose image is not cached starts from the image of its longest cached prefix and applies only the
remaining layers; the new image is content-addressed (`images/<sha256>.erofs`) and recorded (its
`flat_images` row) under the shared GC lock.

A flattened image has no refs rows of its own: every object it references is an object of a layer of
its chain (flatten only drops files, it never makes content), and those layers' `layer:` refs (or, for
layers of an additional store, that store's records) pin them for as long as an image record names the
chain, which is also when gc keeps the flat image.  The one case beyond that, a mounted image whose
record was removed meanwhile, gc covers by reading the objects from the leased image file itself
(flatmount.gc).  This keeps flatten from writing one row per object (50,000 for a 64k-inode image)
for facts the layers already record.

Derived files.  Next to each image it writes, flatten keeps two caches named by the same digest:
`images/<digest>.tree` (the tree in columns, flatmount.image.treecache: loading it is several times
faster than parsing the image, which matters when the image is the cached prefix of a longer chain in a new
process) and `images/<digest>.index` (its `flatmount.diff.ImageIndex`, so the first diff of the image
reads neither the image nor builds anything).  Both are derived state: written after flatten returns by
a background thread (`_Derivers`), atomically (temp file in `tmp/`, rename; no fsync, a torn file
fails its checksum), each checked against the image's name and
size and its own xxh3 checksum before use, ignored (and rewritten where the store is writable) when
missing or damaged.  `derived_paths` names them; whoever removes an image removes those too.

The package: `merge` (layer trees -> one tree, the rules above), `imagecache` (flattened images in the
store: cached, written, recorded), `imagefile` (a new image's file, written with O_DIRECT and hashed
while the writer emits it), `helper` (the forked process that writes half of a big image; off),
`trees` (trees in memory and tree cache files; the derived-file writers), `paths` (where the files are,
which chain an image has).
"""

from __future__ import annotations

from flatmount.flatten.imagecache import FlatImage, flatten_chain, flatten_image, write_flat_image
from flatmount.flatten.paths import cached_flat_image, chain_of
from objects.lazy import lazy_names

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: CLI start-up, see objects/lazy.py)

# The names below are loaded from their submodule on first use (PEP 562): a mount of a cached image
# needs only `paths` and `imagecache`, not the tree code that writes one.
_LAZY = {
    "DEFAULT_ROOT_MODE": "merge", "apply_layer": "merge", "default_root": "merge", "flatten_trees": "merge",
    "root_has_attributes": "merge",
    "DERIVERS": "trees", "TREE_CACHE_SIZE": "trees", "flat_tree": "trees", "load_layer_tree_cache": "trees",
    "load_tree_cache": "trees", "save_tree_cache": "trees", "_Derivers": "trees", "_trees": "trees",
}
_SUBMODULES = frozenset({"helper", "imagecache", "merge", "paths", "trees"})

if TYPE_CHECKING:  # pragma: no cover
    from flatmount.flatten.merge import (
        DEFAULT_ROOT_MODE,
        apply_layer,
        default_root,
        flatten_trees,
        root_has_attributes,
    )
    from flatmount.flatten.trees import (
        DERIVERS,
        TREE_CACHE_SIZE,
        flat_tree,
        load_layer_tree_cache,
        load_tree_cache,
        save_tree_cache,
    )
    from flatmount.flatten.trees import _Derivers as _Derivers
    from flatmount.flatten.trees import _trees as _trees

__all__ = ["DEFAULT_ROOT_MODE", "DERIVERS", "TREE_CACHE_SIZE", "FlatImage",
           "apply_layer", "cached_flat_image", "chain_of", "default_root",
           "flat_tree", "flatten_chain", "flatten_image", "flatten_trees",
           "load_layer_tree_cache", "load_tree_cache", "root_has_attributes", "save_tree_cache",
           "write_flat_image"]


__getattr__ = lazy_names(__name__, globals(), {**{name: "." + module for name, module in _LAZY.items()},
                                                **{name: f".{name}:" for name in _SUBMODULES}})


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})
