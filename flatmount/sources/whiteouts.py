"""The whiteout vocabulary, in one place: how each source says "deleted" and "opaque", and the one
form the tree model uses for both.

Why one module: the tar importer, the containers-storage reader, flatten and the layer export of
diff must agree on every name and xattr; a rule written four times drifts.

- The tree model (flatmount.image.tree) uses overlayfs' own form: a deleted entry is a character
  device 0:0 (`is_whiteout_mode`), an opaque directory carries `trusted.overlay.opaque` = `y`.
- OCI layer tars use AUFS names: `.wh.<name>` deletes `<name>`, `.wh..wh..opq` makes its directory
  opaque; other `.wh..wh.*` names are AUFS bookkeeping (`classify_name`).
- overlayfs upper dirs (c/storage `diff/`) use char 0:0 devices, `*.overlay.opaque` xattrs and, on
  kernels with xattr whiteouts, an empty regular file with `*.overlay.whiteout`
  (`overlay_xattr_name`), under `trusted.overlay.` or, rootless, `user.overlay.`; a content xattr
  `trusted.overlay.X` set through an overlay is escaped as `trusted.overlay.overlay.X`.
- In one layer, an entry beats a whiteout of the same name: the whiteout only hides lower layers
  (`merge_whiteouts`).
"""

from __future__ import annotations

from flatmount.image.tree import OPAQUE_XATTR, S_IFCHR, S_IFMT, Inode

__all__ = [
    "AUFS_META", "ENTRY", "ESCAPED_OVERLAY_PREFIX", "INVALID", "OPAQUE", "OPAQUE_WHITEOUT", "OPAQUE_XATTR",
    "OVERLAY_XATTR_PREFIXES", "TRUSTED_OVERLAY_PREFIX", "USER_OVERLAY_PREFIX", "WHITEOUT",
    "WHITEOUT_META_PREFIX", "WHITEOUT_PREFIX", "WHITEOUT_RDEV", "WHITEOUT_TYPE", "classify_name",
    "is_opaque_xattrs", "is_whiteout_mode", "is_whiteout_name", "make_opaque", "merge_whiteouts",
    "overlay_xattr_name", "whiteout_name",
]

# --- AUFS names (OCI layer tars, fuse-overlayfs) --------------------------------------------------
WHITEOUT_PREFIX = b".wh."
WHITEOUT_META_PREFIX = b".wh..wh."
OPAQUE_WHITEOUT = b".wh..wh..opq"

# --- overlayfs (the tree model, kernel upper dirs) ------------------------------------------------
WHITEOUT_TYPE = S_IFCHR          # a whiteout is a character device ...
WHITEOUT_RDEV = 0                # ... with device number 0:0
TRUSTED_OVERLAY_PREFIX = b"trusted.overlay."
USER_OVERLAY_PREFIX = b"user.overlay."
OVERLAY_XATTR_PREFIXES = (TRUSTED_OVERLAY_PREFIX, USER_OVERLAY_PREFIX)
ESCAPED_OVERLAY_PREFIX = b"trusted.overlay.overlay."   # kernel >= 6.7: a content xattr trusted.overlay.X

# --- what a name in a layer is (`classify_name`) --------------------------------------------------
ENTRY = "entry"            # an ordinary name
WHITEOUT = "whiteout"      # `.wh.<target>`: deletes <target> of lower layers
OPAQUE = "opaque"          # `.wh..wh..opq`: its directory hides every lower child
AUFS_META = "aufs-meta"    # another `.wh..wh.*` name (AUFS bookkeeping such as .wh..wh.plnk)
INVALID = "invalid"        # `.wh.` alone, or a whiteout of `.` or `..`


def is_whiteout_name(name: bytes) -> bool:
    """True for any AUFS-form name (`.wh.*`): its name is all it says, never content."""
    return name.startswith(WHITEOUT_PREFIX)


def classify_name(name: bytes) -> tuple[str, bytes | None]:
    """(kind, target) of one path component of a layer: (ENTRY, None), (WHITEOUT, target),
    (OPAQUE, None), (AUFS_META, None) or (INVALID, target); callers decide what is an error where."""
    if not name.startswith(WHITEOUT_PREFIX):
        return ENTRY, None
    if name == OPAQUE_WHITEOUT:
        return OPAQUE, None
    if name.startswith(WHITEOUT_META_PREFIX):
        return AUFS_META, None
    target = name[len(WHITEOUT_PREFIX):]
    if not target or target in (b".", b".."):
        return INVALID, target
    return WHITEOUT, target


def whiteout_name(name: bytes) -> bytes:
    """The AUFS name that deletes `name` (what a layer tar carries)."""
    return WHITEOUT_PREFIX + name


def is_whiteout_mode(mode: int, rdev: int) -> bool:
    """True for overlayfs' whiteout: a character device 0:0 (the tree model's form)."""
    return mode & S_IFMT == WHITEOUT_TYPE and rdev == WHITEOUT_RDEV


def is_opaque_xattrs(xattrs: dict[bytes, bytes]) -> bool:
    """True when these xattrs make a directory opaque in the tree model."""
    return xattrs.get(OPAQUE_XATTR) == b"y"


def overlay_xattr_name(key: bytes) -> bytes | None:
    """`opaque` for `trusted.overlay.opaque` or `user.overlay.opaque` (and so on), None for an xattr
    outside overlayfs' namespaces.  The escaped form `trusted.overlay.overlay.X` is a content xattr,
    not overlayfs' own: check `ESCAPED_OVERLAY_PREFIX` first."""
    for prefix in OVERLAY_XATTR_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return None


def merge_whiteouts(entries: dict[bytes, Inode], whiteouts: dict[bytes, Inode], *,
                    opaque_dirs: bool) -> list[Inode]:
    """Add the whiteouts of one directory of one layer to its entries, in place: an entry of the same
    name wins (a whiteout only hides lower layers).  With `opaque_dirs` (OCI tar semantics), a
    directory that wins is returned among the directories to make opaque, since the lower one it
    replaces is gone; an overlay upper dir already says so with its own opaque xattr."""
    opaque: list[Inode] = []
    for n, w in whiteouts.items():
        existing = entries.get(n)
        if existing is None:
            entries[n] = w
        elif opaque_dirs and existing.is_dir:
            opaque.append(existing)
    return opaque


def make_opaque(d: Inode) -> None:
    """Mark a directory opaque (a copy of its xattrs: they may be shared)."""
    d.xattrs = dict(d.xattrs)
    d.xattrs[OPAQUE_XATTR] = b"y"
