"""Changes between two flattened trees (what `podman image diff` prints) and the layer tar that turns one
into the other, computed from metadata alone: no mount, no object reads (except `export_layer`, which
streams the content it has to write).

Semantics (containers/storage `pkg/archive`, checked in changes.go/changes_unix.go/changes_linux.go):
- a path present in both trees is changed (`C`) when its type, permission bits, uid, gid, rdev, mtime,
  size (non-directories), symlink target, regular-file content or compared xattrs differ.
  mtime: equal, or the same second with either nanosecond part 0 (c/storage `sameFsTimeSpec`: tar
  writers without sub-second precision).  Content: the inline bytes, or the object (fs-verity digest /
  object path); c/storage does not compare content at all (it trusts mtime and size), we do because
  it costs nothing here.  Xattrs: c/storage's `walkchunk` collects `security.capability` and every
  `user.*` xattr and compares those only (1.43 compared only the capability); so do we, unless
  `strict`.
- directories: size is never compared (c/storage: "not a good measure of change").  c/storage's naive
  `statDifferent` skips directory mtimes too, but its overlay walker (what `podman image diff` runs)
  compares them; we compare them like the overlay walker does.
- an added path is `A`, and so is everything below an added directory; a deleted path is `D`, its
  children are not listed.  A path whose type changed is `C`; if it became a directory, its children
  are `A`; if it stopped being one, the old children are not listed (c/storage `addChanges`).
- a directory whose own metadata is unchanged is not listed, except that every ancestor of an added or
  deleted path is listed as `C` (with no changed fields).  The root itself is never listed.
- order: depth first, parents before children, names in byte order (c/storage's naive walk follows
  Go map order; podman's overlay walk prints in walk order but inserts the ancestors of an added path
  right before it, e.g. `C /usr/share/doc`, `C /usr`, `C /usr/share`, `A /usr/share/doc/f.txt`;
  we print `C /usr`, `C /usr/share`, `C /usr/share/doc`, `A ...`).
- podman itself (libpod `GetDiff`) also drops its container init mount points (`/dev`, `/proc`, `/sys`,
  `/run`, `/etc/hosts`, `/etc/hostname`, `/etc/resolv.conf`, ...) that `podman build` leaves in every
  RUN layer; they are in the image, so we list them.  And podman's overlay walker calls a replaced
  (opaque) directory `D` and lists the new children that existed below as `C` even when identical, and
  a file that was only copied up as `C`; we say what differs between the two trees.

`strict=True` (used by `export_layer`) compares every field exactly: all xattrs, exact mtimes, object
digest and path, and hardlink groups (`links`: the set of names an inode has).

Cost grows with the size of the change: every directory gets an xxh3-128 fingerprint (bottom-up over its
own attributes, sorted names, the children's attributes and fingerprints) and the comparison never
enters a pair of directories with equal fingerprints.  For in-memory trees the fingerprints take one
pass per tree (`TreeIndex`).  For image files, `ImageIndex` keeps them, with every directory's entries
and one hash per entry, in an index file: a diff maps the two index files and decodes only the
directories whose fingerprints differ, and inside those only the entries whose hashes differ (found by
comparing hash arrays in C), so it never reads either image.  Where the index file is:
- a store's flattened image `<root>/images/<digest>.erofs` has it beside, `<digest>.index`, written
  by flatten with the image (`store_index_path`; `index_file_bytes` makes it), so even its first diff
  reads nothing but the two indexes;
- any other image file (or a store image without one: flattened before flatten wrote indexes, or in a
  damaged state) has it in a cache directory under the xxh3-128 of the image, built the first time
  (reading the image once); `cache_index` lets the writer of a loose image store it right away.
Every index is checked (checksum, and the xxh3-128 and size of the image at hand) before use.
"""

from __future__ import annotations

from flatmount.diff.changes import (
    CAPABILITY_XATTR,
    FIELDS,
    Change,
    DiffStats,
    changes,
    compare_inodes,
    diff_images,
    format_changes,
)
from flatmount.diff.export import COMPRESSIONS, LayerExport, export_layer
from flatmount.diff.index import (
    CACHE_KEEP,
    ImageIndex,
    Side,
    TreeIndex,
    cache_index,
    default_cache_dir,
    index_file_bytes,
    store_index_path,
)

__all__ = ["CACHE_KEEP", "CAPABILITY_XATTR", "COMPRESSIONS", "FIELDS", "Change", "DiffStats", "ImageIndex",
           "LayerExport", "Side", "TreeIndex", "cache_index", "changes", "compare_inodes", "default_cache_dir",
           "diff_images", "export_layer", "format_changes", "index_file_bytes", "store_index_path"]
