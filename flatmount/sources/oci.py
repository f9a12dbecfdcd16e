"""OCI image layout (`oci:DIR[:TAG]`) -> image in the primary store.

Why its own module: the layout is the interchange format (skopeo, podman save, buildah push oci:), and
reading it safely is mostly about not trusting it: every blob is verified against its digest while it
streams (and its size against the descriptor), each layer's uncompressed stream against the config's
rootfs.diff_ids, blob paths are built only from validated `<alg>:<hex>` digests, and JSON documents
are size-capped before parsing.

Selection: with a TAG, the index.json descriptor whose `org.opencontainers.image.ref.name` equals it;
without, the only descriptor (an error if there are several).  A nested image index (multi-platform)
resolves to the entry for this host's os/architecture, or its only entry.  The image is named TAG
(normalised, e.g. `demo` -> `demo:latest`), or the descriptor's ref.name when no TAG was given, unless
`name` overrides it.  TAG is what follows the first `:` after DIR, unless `DIR:TAG` as a whole is an
existing directory.

A layer whose id (from the diff_id chain) is already in the primary or an additional store is not
read at all.
"""

from __future__ import annotations

import json
import os

from flatmount.errors import DigestMismatchError, LayerError, NotFoundError
from flatmount.record import record
from flatmount.store.records import chain_id
from objects.paths import is_hex, is_sha256_digest

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: CLI start-up, see objects/lazy.py)

if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, BinaryIO

    from flatmount.sources.layers import Progress
    from flatmount.store.batch import PullResult
    from flatmount.store.core import Store

REF_NAME = "org.opencontainers.image.ref.name"
MAX_JSON = 8 << 20   # index, manifests and configs larger than this are refused
MAX_JSON_DEPTH = 100  # and nested deeper than this (real ones nest a handful of levels)

MT_INDEX = ("application/vnd.oci.image.index.v1+json",
            "application/vnd.docker.distribution.manifest.list.v2+json")
MT_MANIFEST = ("application/vnd.oci.image.manifest.v1+json",
               "application/vnd.docker.distribution.manifest.v2+json")
MT_CONFIG = ("application/vnd.oci.image.config.v1+json",
             "application/vnd.docker.container.image.v1+json")
LAYER_MEDIA_TYPES = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
}
_DIGEST_HEX = {"sha256": 64, "sha512": 128}   # algorithm -> hex digits of its digest


@record
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict
    platform: dict | None

    @classmethod
    def parse(cls, d: Any, where: str) -> Descriptor:
        if not isinstance(d, dict):
            raise LayerError(f"{where}: descriptor is not an object")
        mt, digest, size = d.get("mediaType"), d.get("digest"), d.get("size")
        if not isinstance(mt, str) or not isinstance(digest, str):
            raise LayerError(f"{where}: descriptor without mediaType/digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise LayerError(f"{where}: descriptor {digest} has no valid size")
        alg, _, hexpart = digest.partition(":")
        digits = _DIGEST_HEX.get(alg)
        if digits is None:
            raise LayerError(f"{where}: unsupported digest algorithm in {digest!r}")
        if not is_hex(hexpart, digits):
            raise LayerError(f"{where}: malformed digest {digest!r}")
        ann = d.get("annotations") or {}
        if not isinstance(ann, dict):
            raise LayerError(f"{where}: descriptor {digest}: annotations must be an object")
        for k, v in ann.items():
            if not isinstance(v, str):  # image-spec: annotation values MUST be strings
                raise LayerError(f"{where}: descriptor {digest}: annotation {k!r} is not a string")
        plat = d.get("platform")
        return cls(mt, digest, size, ann, plat if isinstance(plat, dict) else None)


class Layout:
    """An OCI image layout directory."""

    def __init__(self, path: str):
        self.path = path
        try:
            with self._open_file("oci-layout", f"{path}/oci-layout") as f:
                data = json.loads(f.read(4096))
        except FileNotFoundError:
            raise LayerError(f"{path} is not an OCI image layout (no oci-layout file)") from None
        except OSError as e:
            raise LayerError(f"{path}/oci-layout is unreadable: {e.strerror}") from None
        except (ValueError, RecursionError) as e:
            raise LayerError(f"{path}/oci-layout is not valid JSON: {_json_problem(e)}") from None
        if not isinstance(data, dict) or data.get("imageLayoutVersion") != "1.0.0":
            raise LayerError(f"{path}/oci-layout: unsupported imageLayoutVersion")

    def blob_path(self, desc: Descriptor) -> str:
        alg, _, hexpart = desc.digest.partition(":")
        return os.path.join(self.path, "blobs", alg, hexpart)

    def _open_file(self, rel: str, what: str):
        """File `rel` of the layout (e.g. `blobs/sha256/<hex>`): a regular file reached without following
        any symlink below the layout directory (which the user named, so it may be one).  The layout
        is someone else's: a symlink or FIFO there is refused, its target never looked at."""
        from flatmount.safepath import open_parent_below, open_regular

        parts = rel.split("/")
        fd = open_parent_below(self.path, parts, error=LayerError, what=what)
        try:
            return open_regular(parts[-1], what, follow=False, dir_fd=fd, error=LayerError)
        finally:
            os.close(fd)

    def open_blob(self, desc: Descriptor, where: str):
        """The blob's content, read at most to its declared size plus one byte (enough to tell that it is
        too long): a blob may not make an import read forever."""
        alg, _, hexpart = desc.digest.partition(":")
        try:
            f = self._open_file(f"blobs/{alg}/{hexpart}", f"{where}: blob {desc.digest}")
        except FileNotFoundError:
            raise LayerError(f"{where}: blob {desc.digest} is missing from {self.path}/blobs") from None
        except OSError as e:
            raise LayerError(f"{where}: cannot open blob {desc.digest}: {e.strerror}") from None
        return BoundedReader(f, desc.size, f"{where}: blob {desc.digest}")

    def read_json_blob(self, desc: Descriptor, where: str) -> tuple[bytes, dict]:
        """A small JSON blob, verified against its descriptor."""
        import hashlib

        if desc.size > MAX_JSON:
            raise LayerError(f"{where}: {desc.digest} is {desc.size} bytes, too large for a JSON document")
        with self.open_blob(desc, where) as f:
            data = f.read(MAX_JSON + 1)
        alg, _, hexpart = desc.digest.partition(":")
        if len(data) != desc.size:
            raise DigestMismatchError(f"{where}: blob {desc.digest} is {len(data)} bytes, expected {desc.size}")
        if hashlib.new(alg, data).hexdigest() != hexpart:
            raise DigestMismatchError(f"{where}: blob {desc.digest} does not match its digest")
        return data, _parse_json(data, where)

    def index(self) -> dict:
        p = os.path.join(self.path, "index.json")
        try:
            with self._open_file("index.json", p) as f:
                data = f.read(MAX_JSON + 1)
        except FileNotFoundError:
            raise LayerError(f"{self.path}: index.json is missing") from None
        except OSError as e:
            raise LayerError(f"{p} is unreadable: {e.strerror}") from None
        if len(data) > MAX_JSON:
            raise LayerError(f"{p} is too large")
        return _parse_json(data, p)

    def select(self, tag: str | None) -> Descriptor:
        """The manifest descriptor for `tag` (see module docstring)."""
        index = self.index()
        descs = [Descriptor.parse(d, f"{self.path}/index.json") for d in _list(index, "manifests", "index.json")]
        if tag is not None:
            hits = [d for d in descs if d.annotations.get(REF_NAME) == tag]
            if not hits:
                tags = sorted({str(d.annotations[REF_NAME]) for d in descs if REF_NAME in d.annotations})
                raise NotFoundError(f"tag {tag!r} is not in {self.path}/index.json (tags: "
                                    f"{', '.join(tags) or 'none'})")
            if len(hits) > 1:
                hits = [self._platform_pick(hits, f"{self.path} tag {tag}")]
            desc = hits[0]
        elif len(descs) == 1:
            desc = descs[0]
        elif not descs:
            raise LayerError(f"{self.path}/index.json lists no manifests")
        else:
            tags = sorted({str(d.annotations[REF_NAME]) for d in descs if REF_NAME in d.annotations})
            raise LayerError(f"{self.path} holds {len(descs)} manifests: give a tag (oci:DIR:TAG); tags: "
                             f"{', '.join(tags) or 'none'}")
        for _ in range(4):  # nested indexes
            if desc.media_type not in MT_INDEX:
                break
            _, sub = self.read_json_blob(desc, f"{self.path} index {desc.digest}")
            subs = [Descriptor.parse(d, f"index {desc.digest}") for d in _list(sub, "manifests", desc.digest)]
            if not subs:
                raise LayerError(f"{self.path}: image index {desc.digest} lists no manifests")
            picked = self._platform_pick(subs, f"{self.path} index {desc.digest}")
            desc = Descriptor(picked.media_type, picked.digest, picked.size,
                              {**picked.annotations, **({REF_NAME: desc.annotations[REF_NAME]}
                                                        if REF_NAME in desc.annotations else {})},
                              picked.platform)
        if desc.media_type not in MT_MANIFEST:
            raise LayerError(f"{self.path}: {desc.digest} has unsupported media type {desc.media_type!r}")
        return desc

    @staticmethod
    def _platform_pick(descs: list[Descriptor], where: str) -> Descriptor:
        from flatmount.store.batch import host_architecture

        arch = host_architecture()
        hits = [d for d in descs if d.platform and d.platform.get("os", "linux") == "linux"
                and d.platform.get("architecture") == arch]
        if len(hits) >= 1:
            return hits[0]
        if len(descs) == 1:
            return descs[0]
        raise LayerError(f"{where}: {len(descs)} manifests and none for linux/{arch}")


class BoundedReader:
    """A blob read at most to its declared `size` plus one byte: that byte, if it comes, raises
    DigestMismatchError (`where`: what to call the blob), so a blob longer than declared (or endless)
    is never read further."""

    def __init__(self, f: BinaryIO, size: int, where: str):
        self._f = f
        self._size = size
        self._left = size + 1
        self._where = where

    def _count(self, n: int) -> None:
        self._left -= n
        if self._left <= 0:
            raise DigestMismatchError(f"{self._where} is longer than declared: its descriptor says "
                                      f"{self._size} bytes")

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0 or n > self._left:
            n = self._left
        if n <= 0:
            return b""
        b = self._f.read(n)
        self._count(len(b))
        return b

    def readinto(self, b: bytearray | memoryview) -> int:
        mv = memoryview(b).cast("B")
        if len(mv) > self._left:
            mv = mv[:self._left]
        if not len(mv):
            return 0
        n = self._f.readinto(mv) or 0
        self._count(n)
        return n

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> BoundedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _parse_json(data: bytes, where: str) -> dict:
    try:
        # NaN/Infinity: Python's extension, not JSON (Go's parser, podman's, refuses them); kept, they
        # would make every later `--json` output of the store invalid JSON
        doc = json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise LayerError(f"{where}: invalid JSON ({_json_problem(e)})") from None
    if not isinstance(doc, dict):
        raise LayerError(f"{where}: JSON document is not an object")
    if _depth_exceeds(doc, MAX_JSON_DEPTH):
        raise LayerError(f"{where}: invalid JSON (arrays or objects nested too deeply: more than "
                         f"{MAX_JSON_DEPTH} levels)")
    return doc


def _depth_exceeds(doc: Any, limit: int) -> bool:
    """True if `doc` nests lists/objects more than `limit` deep (checked without recursion).

    Why: a document the parser still accepts may be too deep for every later reader of the stored
    config (`inspect`, `--json` output), which would then fail on every listing of the store.
    """
    stack = [(doc, 1)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            return True
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values() if isinstance(x, dict | list))
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v if isinstance(x, dict | list))
    return False


def _json_problem(e: Exception) -> str:
    """What is wrong with a JSON document, in one line (RecursionError: nesting beyond the parser)."""
    return "arrays or objects nested too deeply" if isinstance(e, RecursionError) else " ".join(str(e).split())


def _list(doc: dict, key: str, where: str) -> list:
    v = doc.get(key)
    if not isinstance(v, list):
        raise LayerError(f"{where}: `{key}` is missing or not a list")
    return v


def split_spec(spec: str) -> tuple[str, str | None]:
    """`DIR[:TAG]` -> (DIR, TAG or None)."""
    if os.path.isdir(spec) or ":" not in spec:
        return spec, None
    d, _, tag = spec.partition(":")
    return d, (tag or None)


def image_layers(manifest: dict, config: dict, source: str, mwhere: str,
                 cwhere: str) -> tuple[list[Descriptor], list[str], list[str]]:
    """(layer descriptors, diff_ids, layer ids) of an image, checked against each other: known layer
    media types, one well-formed sha256 diff_id per layer.  `source` names the image in errors,
    `mwhere`/`cwhere` its manifest and config."""
    ldescs = [Descriptor.parse(d, f"{mwhere} layer {i}")
              for i, d in enumerate(_list(manifest, "layers", mwhere))]
    for i, d in enumerate(ldescs):
        if d.media_type not in LAYER_MEDIA_TYPES:
            raise LayerError(f"{source}: layer {i} ({d.digest}) has unknown media type {d.media_type!r}")
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(
            isinstance(x, str) and is_sha256_digest(x) for x in diff_ids):
        raise LayerError(f"{cwhere}: rootfs.diff_ids missing or malformed")
    if len(diff_ids) != len(ldescs):
        raise LayerError(f"{source}: manifest has {len(ldescs)} layers but the config {len(diff_ids)} diff_ids")
    ids: list[str] = []
    parent: str | None = None
    for d in diff_ids:
        parent = chain_id(parent, d)
        ids.append(parent)
    return ldescs, diff_ids, ids


def pull_oci(store: Store, spec: str, name: str | None = None, *,
             progress: Progress | None = None) -> PullResult:
    """Import the image `DIR[:TAG]` of an OCI layout into the primary store, all or nothing."""
    from flatmount.sources.layers import HashingReader, read_tar, verify
    from flatmount.store.batch import ImportBatch, PullResult

    path, tag = split_spec(spec)
    layout = Layout(path)
    mdesc = layout.select(tag)
    manifest_bytes, manifest = layout.read_json_blob(mdesc, f"{path} manifest")
    cdesc = Descriptor.parse(manifest.get("config"), f"manifest {mdesc.digest} config")
    if cdesc.media_type not in MT_CONFIG:
        raise LayerError(f"manifest {mdesc.digest}: unsupported config media type {cdesc.media_type!r}")
    if not cdesc.digest.startswith("sha256:"):
        raise LayerError(f"manifest {mdesc.digest}: config digest must be sha256 (it is the image id)")
    config_bytes, config = layout.read_json_blob(cdesc, f"{path} config")
    ldescs, diff_ids, ids = image_layers(manifest, config, path, f"manifest {mdesc.digest}",
                                         f"config {cdesc.digest}")
    image_name = name if name is not None else (tag if tag is not None else mdesc.annotations.get(REF_NAME))

    imported: list[str] = []
    present: list[str] = []
    total_bytes = total_entries = 0
    with ImportBatch(store) as batch:
        for i, (desc, diff_id, lid) in enumerate(zip(ldescs, diff_ids, ids, strict=True)):
            if batch.has_layer(lid):
                present.append(lid)
                continue
            label = f"{path} layer {i} ({desc.digest[:19]})"
            alg = desc.digest.partition(":")[0]
            base = total_bytes

            def report(nbytes: int, entries: int, _base: int = base, _entries: int = total_entries) -> None:
                if progress is not None:
                    progress(_base + nbytes, _entries + entries)

            with layout.open_blob(desc, label) as f:
                layer = read_tar(HashingReader(f, alg), batch.objects, label=label,
                                 progress=report if progress is not None else None, size=desc.size)
            verify(layer, blob_digest=desc.digest, blob_size=desc.size, diff_id=diff_id, label=label)
            total_bytes += layer.diff_size
            total_entries += layer.entries
            batch.add_layer(layer.tree, parent=ids[i - 1] if i else None, diff_id=diff_id,
                            compressed_digest=desc.digest, compressed_size=desc.size,
                            diff_size=layer.diff_size)
            imported.append(lid)
        created = config.get("created")   # the image's own creation time (else: the import's)
        batch.set_image(cdesc.digest, ids[-1] if ids else None, config=config_bytes,
                        manifest=manifest_bytes, names=[image_name] if image_name else [],
                        created=created if isinstance(created, str) and created else None)
        image = batch.commit()
    assert image is not None
    return PullResult(image, tuple(imported), tuple(present), total_bytes, total_entries)
