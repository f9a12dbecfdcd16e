"""`pull SOURCE`: import an image from a layer source into the primary store, all or nothing.

Sources (`parse_source`):
    oci:DIR[:TAG]                 OCI image layout (flatmount.sources.oci); TAG = org.opencontainers.image.ref.name
    tar:PATH | tar:-              one layer tarball (tar, tar.gz, tar.zst by magic); `-` is stdin
    dir:PATH                      a directory tree as one layer
    containers-storage:[...]IMG   a podman/c/storage image (flatmount.sources.cstorage.pull_cstorage)
    docker://REF, oci-archive:..., docker-archive:... and skopeo's other transports: through skopeo's
                                  image proxy (flatmount.sources.registry)
    NAME[:TAG|@DIGEST]            (not an existing path) a registry image; short names resolved by
                                  registries.conf as podman does (flatmount.sources.registry)
    PATH                          a directory with an `oci-layout` file -> oci:, another directory ->
                                  dir:, a file -> tar:

Images from `tar:` and `dir:` sources get a synthesized OCI config (os linux, host architecture,
rootfs.diff_ids) whose sha256 is their id, so the same content pulled twice is the same image.  For
`dir:` sources the diff_id is the sha256 of the layer's composefs dump (flatmount.image.dump), not of a tar:
it identifies the content (paths, metadata, file digests) without inventing a tar byte stream; the
directory is read like a c/storage diff dir (overlay whiteouts and opaque xattrs, AUFS `.wh.` files;
see flatmount.sources.cstorage.normalise_layer_tree).

How an import stays all-or-nothing (`ImportBatch`, flatmount.store.batch): file content goes straight into the primary's
object store (`ObjectStore.sync()` once per layer), each layer's EROFS image into a private staging
directory `<root>/tmp/import-*` (flock'ed while alive; fsynced).  Only when every digest checked out
are, inside ONE transaction, the layer images renamed to `layers/<id>.erofs` and the layer, refs,
image and name rows inserted.  The shared GC lock is held from before the first object put to the
commit.  A failed import removes the objects it created (those its puts created, never content it
found already stored, e.g. the files of a removed image a live mount still reads), unless a refs row,
a live mount or an additional store needs them by then; done under the exclusive GC lock, so no other
import can be relying on them (if another import is running they are left to `gc`), so the store is
as it was.  A killed import leaves
at most unreferenced objects (garbage for `gc`), its staging dir and layer images without records:
the next write-open removes the latter two (`Store.clean_tmp`), and the same pull simply runs again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import sys
import time

from flatmount.errors import LayerError
from flatmount.image.tree import inodes
from flatmount.store.batch import ImportBatch, PullResult, host_architecture
from flatmount.store.records import chain_id

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: CLI start-up, see objects/lazy.py)

if TYPE_CHECKING:  # pragma: no cover
    from typing import Any

    from flatmount.image.tree import Inode
    from flatmount.sources.layers import Progress
    from flatmount.sources.registry import Events, RegistryOptions
    from flatmount.store.core import Store

def synthesized_config(diff_ids: list[str]) -> bytes:
    """A minimal OCI image config for an image that came without one (deterministic bytes)."""
    cfg = {"architecture": host_architecture(), "os": "linux", "config": {},
           "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    return json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()


# --- sources -------------------------------------------------------------------------------------

def parse_source(source: str) -> tuple[str, str]:
    """(kind, rest) with kind in oci, tar, dir, containers-storage."""
    for kind in ("oci", "tar", "dir", "containers-storage"):
        if source.startswith(kind + ":"):
            rest = source[len(kind) + 1:]
            if not rest and kind != "containers-storage":
                raise LayerError(f"source {source!r}: missing path after '{kind}:'")
            return kind, rest
    if source == "-":
        return "tar", "-"
    if os.path.isdir(source):
        return ("oci" if os.path.isfile(os.path.join(source, "oci-layout")) else "dir"), source
    if os.path.exists(source):
        return "tar", source
    from flatmount.sources.registry import is_transport_ref, looks_like_reference

    if is_transport_ref(source):
        return "transport", source
    if looks_like_reference(source):  # (`name:tag` too, as podman reads it)
        return "reference", source
    m = re.match(r"([a-z][a-z0-9+.-]*):", source)
    if m:
        raise LayerError(f"source {source!r}: unsupported transport {m.group(1)!r} (use oci:, tar:, dir:, "
                         "containers-storage:, docker://, oci-archive: or docker-archive:)")
    raise LayerError(f"source {source!r} does not exist")


def pull(store: Store, source: str, name: str | None = None, *, progress: Progress | None = None,
         registry: RegistryOptions | None = None, events: Events | None = None) -> PullResult:
    """Import the image at `source` into the primary store of `store` (see module docstring)."""
    kind, rest = parse_source(source)
    if kind == "transport":
        from flatmount.sources.registry import pull_transport

        return pull_transport(store, rest, name, options=registry, events=events)
    if kind == "reference":
        from flatmount.sources.registry import pull_short_name

        return pull_short_name(store, rest, name, options=registry, events=events)
    if kind == "containers-storage":
        from flatmount.sources.cstorage import pull_cstorage

        before = {layer.id for layer in store.layers()}
        image = pull_cstorage(store, rest, name)
        chain = [layer.id for layer in store.layer_chain(image.top_layer)] if image.top_layer else []
        return PullResult(image, tuple(i for i in chain if i not in before),
                          tuple(i for i in chain if i in before))
    if kind == "oci":
        from flatmount.sources.oci import pull_oci

        return pull_oci(store, rest, name, progress=progress)
    if kind == "tar":
        return pull_tar(store, rest, name, progress=progress)
    return pull_dir(store, rest, name)


def pull_tar(store: Store, path: str, name: str | None = None, *, progress: Progress | None = None) -> PullResult:
    """A layer tarball as a one-layer image."""
    from flatmount.safepath import open_regular
    from flatmount.sources.layers import read_tar

    label = "stdin" if path == "-" else path
    try:  # the user's own path may be a symlink; a FIFO or device (e.g. /dev/zero) would never end
        f = sys.stdin.buffer if path == "-" else open_regular(path, f"tar source {path}", follow=True,
                                                              error=LayerError)
    except OSError as e:
        raise LayerError(f"cannot open {path}: {e.strerror}") from None
    with contextlib.ExitStack() as stack:
        if path != "-":
            stack.enter_context(f)
        with ImportBatch(store) as batch:
            layer = read_tar(f, batch.objects, label=label, progress=progress, size=_file_size(f))
            lid = chain_id(None, layer.diff_id)
            present = batch.has_layer(lid)
            if not present:
                batch.add_layer(layer.tree, parent=None, diff_id=layer.diff_id,
                                compressed_digest=layer.compressed_digest,
                                compressed_size=layer.compressed_size, diff_size=layer.diff_size)
            config = synthesized_config([layer.diff_id])
            batch.set_image(hashlib.sha256(config).hexdigest(), lid, config=config,
                            names=[name] if name else [])
            image = batch.commit()
    assert image is not None
    return PullResult(image, () if present else (lid,), (lid,) if present else (),
                      layer.diff_size, layer.entries)


def pull_dir(store: Store, path: str, name: str | None = None) -> PullResult:
    """A directory tree as a one-layer image (diff_id: sha256 of the layer's composefs dump)."""
    from flatmount.image.dump import write_dump
    from flatmount.image.tree import count_inodes
    from flatmount.sources.cstorage import normalise_layer_tree
    from flatmount.sources.directory import scan_directory

    with ImportBatch(store) as batch:
        tree = scan_directory(path, batch.objects)
        tree = normalise_layer_tree(tree, name=path)
        h = _HashWriter()
        write_dump(tree, h)  # type: ignore[arg-type]
        diff_id = "sha256:" + h.hash.hexdigest()
        lid = chain_id(None, diff_id)
        present = batch.has_layer(lid)
        if not present:
            batch.add_layer(tree, parent=None, diff_id=diff_id, diff_size=_content_size(tree))
        config = synthesized_config([diff_id])
        batch.set_image(hashlib.sha256(config).hexdigest(), lid, config=config,
                        names=[name] if name else [])
        image = batch.commit()
    assert image is not None
    return PullResult(image, () if present else (lid,), (lid,) if present else (), 0, count_inodes(tree))


class _HashWriter:
    def __init__(self) -> None:
        self.hash = hashlib.sha256()

    def write(self, b: bytes) -> int:
        self.hash.update(b)
        return len(b)

    def flush(self) -> None:
        pass


def _content_size(tree: Inode) -> int:
    return sum(n.size for n in inodes(tree) if n.entries is None and n.is_reg)


def _file_size(f) -> int | None:
    """The size of a regular file (None for stdin's pipe or anything else that has none)."""
    try:
        st = os.fstat(f.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


# --- progress ------------------------------------------------------------------------------------

class TerminalProgress:
    """`progress(bytes, entries)` that redraws one stderr line at most 5 times a second."""

    def __init__(self, stream: Any = None, label: str = "importing"):
        self.stream = stream or sys.stderr
        self.label = label
        self._last = 0.0
        self._start = time.monotonic()
        self._drawn = False

    def __call__(self, nbytes: int, entries: int) -> None:
        now = time.monotonic()
        if now - self._last < 0.2:
            return
        self._last = now
        rate = nbytes / max(now - self._start, 1e-6) / 1e6
        self.stream.write(f"\r{self.label}: {nbytes / 1e6:,.1f} MB, {entries:,} entries ({rate:,.0f} MB/s)\x1b[K")
        self.stream.flush()
        self._drawn = True

    def done(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
