"""The flatmount API: `flatmount.open_store(...)` gives the Store users see.

    import flatmount
    with flatmount.open_store(root="/var/lib/flatmount") as store:
        store.pull("oci:./layout:demo")
        with store.mount("demo") as merged:
            ...

`Store` is the store's records and paths (flatmount.store.core.Store) plus the data flow as methods:
pull, flatten, mount, bundle, run, mounts, diff, gc, fsck, usage.  Each is a thin call into the
operation module that does the work (flatmount.pull, .flatten, .mount, ...), which takes the lower
store: this facade is the one place that knows every operation, so the operations and the store never
import each other upward.
"""

from __future__ import annotations

import contextlib
import os

from flatmount.store import core

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: CLI start-up, see objects/lazy.py)

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Sequence
    from typing import Any

    from flatmount.diff import Change
    from flatmount.flatten import FlatImage
    from flatmount.fsck import FsckResult
    from flatmount.gc import GcResult
    from flatmount.image.tree import Inode
    from flatmount.run.bundle import Bundle
    from flatmount.run.container import RunResult
    from flatmount.run.runspec import RunOptions
    from flatmount.store.batch import PullResult
    from flatmount.store.leases import Lease
    from flatmount.usage import UsageReport


def open_store(root: str | os.PathLike | None = None, additional: Sequence[str | os.PathLike] | None = None,
               runroot: str | os.PathLike | None = None, config: str | os.PathLike | None = None,
               readonly: bool = False) -> Store:
    """The primary store plus its additional stores, from arguments, then config file, then defaults
    (flatmount.store.core.open_store); nothing is created here."""
    return core.open_store(root, additional, runroot, config, readonly, store_class=Store)  # type: ignore[return-value]


class Store(core.Store):
    """A primary store with the operations of flatmount as methods (see the module docstring)."""

    def pull(self, source: str, name: str | None = None) -> PullResult:
        """Import `oci:DIR[:TAG]`, `containers-storage:...`, `tar:FILE` or `dir:PATH`; see flatmount.pull."""
        from flatmount.pull import pull

        return pull(self, source, name)

    def flatten(self, ref: str) -> FlatImage:
        """Flatten image `ref` into one EROFS image (cached by chain); see flatmount.flatten."""
        from flatmount.flatten import flatten_image

        return flatten_image(self, ref)

    def mount(self, ref: str) -> contextlib.AbstractContextManager[str]:
        """`with store.mount(ref) as merged:` a private read-only mount of the flattened image."""
        from flatmount.mount import mount

        return mount(self, ref)

    def bundle(self, ref: str, bundle_dir: str, opts: RunOptions | None = None) -> contextlib.AbstractContextManager[Bundle]:
        """`with store.bundle(ref, dir) as b:` an OCI runtime bundle of the image; see flatmount.run.bundle."""
        from flatmount.run.bundle import bundle

        return bundle(self, ref, bundle_dir, opts)

    def run(self, ref: str, opts: RunOptions | None = None, **kw: Any) -> RunResult:
        """Run a container of image `ref` on runc and wait for it; see flatmount.run.container.run."""
        from flatmount.run.container import run

        return run(self, ref, opts, **kw)

    def mounts(self) -> list[Lease]:
        """Live mount leases of this store."""
        from flatmount.mount import list_mounts

        return list_mounts(self)

    def image_file(self, ref: str) -> str:
        """The EROFS image for `ref`: an existing file is taken as an image file, else the flattened
        image of the store image `ref` (written if not cached)."""
        if os.path.isfile(ref):
            return os.path.abspath(ref)
        from flatmount.store.integrity import verify_flat_image

        flat = self.flatten(ref)
        verify_flat_image(self, flat.path, flat.digest)   # (a stat when verified since last written)
        return flat.path

    def diff(self, a: str, b: str, strict: bool = False) -> list[Change]:
        """Changes from image `a` to image `b` (names, ids or image files), without mounting."""
        from flatmount.diff import diff_images

        return diff_images(self.image_file(a), self.image_file(b), strict=strict)

    def gc(self, dry_run: bool = False) -> GcResult:
        """Remove unneeded flattened images and unreferenced objects; see flatmount.gc."""
        from flatmount.gc import gc

        return gc(self, dry_run=dry_run)

    def fsck(self, repair: bool = False) -> FsckResult:
        """Check (and with `repair`, repair what is proven safe); see flatmount.fsck."""
        from flatmount.fsck import fsck

        return fsck(self, repair=repair)

    def usage(self) -> UsageReport:
        """Object usage: totals, per image unique/shared bytes; see flatmount.usage."""
        from flatmount.usage import usage

        return usage(self)

    def layer_tree(self, layer_id: str) -> Inode:
        """The layer's tree as recorded (whiteouts and opaque markers kept)."""
        from flatmount.store.integrity import read_layer_tree

        return read_layer_tree(self.layer(layer_id))
