"""Read a containers/storage (podman, buildah, CRI-O) overlay store directly, without podman.

Why: the layers podman already unpacked are the cheapest source there is (no tar, no decompression),
and reading them in place never needs c/storage's merged dirs, whose sharing between processes is the
race this project removes (STORES.md section 2).

What is read, and how (c/storage 1.43 layout, checked against c/storage main):
- `storage.conf` (TOML): `[storage] driver, graphroot, runroot, imagestore` and
  `[storage.options] additionalimagestores`.  Lookup order for layers and images: `imagestore` (if
  set), the graphroot, then each additional image store (AIS) in config order.
- `overlay-layers/layers.json` and `overlay-images/images.json`, each read while holding a POSIX read
  lock (`lockf`, flatmount.store.locks.posix_read_lock) on `layers.lock` / `images.lock`, as c/storage's readers do.  Nothing in any
  c/storage store is ever written: lock files are opened read-only and a missing lock file is not
  created (the store then has no writers to exclude).  During `pull_cstorage` the read locks are held
  from the JSON read until the last diff dir is scanned, so podman cannot delete a layer under us.
- Image big data (`manifest`, `sha256:<config>`, ...) in `overlay-images/<id>/<name>` where `<name>`
  is the key itself if it matches `[0-9a-z.]*`, else `"=" + base64(key)`.
- A layer's content is its `overlay/<id>/diff` directory, scanned with `flatmount.sources.directory` and then
  normalised to the one tree vocabulary (`normalise_layer_tree`, rules in its docstring).

Root directory rule: the layer tree's root keeps the attributes of the `diff/` directory as read
(c/storage makes it 0555, owned by the parent layer's root owner); flatten decides what the merged
root looks like.

Layer ids: recomputed from the diff_id chain (base = diff_id hex, child = sha256(parent + "+" +
diff_id hex)).  For every layer c/storage itself created from a tar this equals its own id; for
layers whose c/storage id follows another rule (partial zstd:chunked pulls) the recomputed id keeps
one chain = one id across all flatmount stores.

Verification: a `diff-digest` in layers.json is only a claim.  A layer is recorded under that id only
if its tar stream, rebuilt from `overlay-layers/<id>.tar-split.gz` and the diff dir's files
(flatmount.sources.tarsplit), hashes to it; the layer is then read from that stream.  Otherwise it is read
from its diff dir and recorded under `flatmount.store.records.unverified_chain_id`, which no digest-checked
pull reuses (`pull_cstorage`).  An image's config must hash to its id.

Paths: the graph root (the user's choice) may be a symlink; nothing below it is followed if it is one
(`open_in_store`): overlay-layers/, overlay-images/, their JSON, lock and big-data files, overlay/,
the layer dir and its diff dir.  `link` files and `l/` symlinks are never read.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import stat
import threading
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

from flatmount.errors import FormatError, LayerError, NotFoundError, StoreError
from flatmount.image.tree import OPAQUE_XATTR, S_IFDIR, S_IFMT, Inode
from flatmount.record import record
from flatmount.sources import whiteouts as wh
from flatmount.store.locks import posix_read_lock
from flatmount.store.records import chain_id
from objects.paths import is_hex, is_sha256_digest

if TYPE_CHECKING:  # pragma: no cover
    from flatmount.store.core import Store
    from flatmount.store.records import ImageRecord
    from objects import ObjectStore

TRANSPORT = "containers-storage:"
DEFAULT_CONF_PATHS = ("/etc/containers/storage.conf", "/usr/share/containers/storage.conf")
DEFAULT_GRAPHROOT = "/var/lib/containers/storage"
DEFAULT_RUNROOT = "/run/containers/storage"
_ADD_STORE_HINT = ("; a store holding it is added in storage.conf under [storage.options] "
                   "additionalimagestores = [\"DIR\"] (the file $CONTAINERS_STORAGE_CONF names, else "
                   "/etc/containers/storage.conf), or name its graphroot: containers-storage:[GRAPHROOT]IMAGE")

# --- overlay / AUFS vocabulary found inside diff dirs ---------------------------------------------
# (whiteout names and overlay xattrs: flatmount.sources.whiteouts)
OVERRIDE_STAT = b"user.containers.override_stat"  # c/storage force_mask: "uid:gid:mode"
# overlay keys (after the trusted.overlay./user.overlay. prefix) whose presence means the diff dir
# alone does not hold the layer (the data or the directory's identity lives in a lower layer).
_DEPENDENT_KEYS = frozenset({b"redirect", b"metacopy"})
# host labelling, not image content (c/storage's archive code ignores it too: xattrsToIgnore)
_IGNORED_XATTRS = frozenset({b"security.selinux"})


# ==================================================================================================
# storage.conf
# ==================================================================================================

@record
class StorageConfig:
    """The part of a containers storage.conf that locating layers and images needs."""

    graphroot: str
    runroot: str | None = None
    driver: str = "overlay"
    imagestore: str | None = None
    additional: tuple[str, ...] = ()
    path: str | None = None          # the file it came from (None: built-in defaults)


def default_config_path() -> str | None:
    """`$CONTAINERS_STORAGE_CONF`, else the first system storage.conf that exists, else None."""
    env = os.environ.get("CONTAINERS_STORAGE_CONF")
    if env:
        return env
    for p in DEFAULT_CONF_PATHS:
        if os.path.exists(p):
            return p
    return None


def parse_config(data: bytes | str, path: str | None = None) -> StorageConfig:
    """A StorageConfig from storage.conf text (missing keys get c/storage's rootful defaults)."""
    try:
        doc = tomllib.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path or 'storage.conf'}: {e}") from None
    st = doc.get("storage", {})
    opts = st.get("options", {}) if isinstance(st, dict) else {}
    if not isinstance(st, dict) or not isinstance(opts, dict):
        raise FormatError(f"{path or 'storage.conf'}: [storage] must be a table")
    ais = opts.get("additionalimagestores", [])
    if not isinstance(ais, list) or not all(isinstance(a, str) for a in ais):
        raise FormatError(f"{path or 'storage.conf'}: additionalimagestores must be a list of paths")
    for a in ais:
        if not os.path.isabs(a):
            raise FormatError(f"{path or 'storage.conf'}: additional image store {a!r} is not absolute")
    return StorageConfig(
        graphroot=str(st.get("graphroot") or DEFAULT_GRAPHROOT),
        runroot=str(st.get("runroot") or DEFAULT_RUNROOT),
        driver=str(st.get("driver") or "overlay"),
        imagestore=str(st["imagestore"]) if st.get("imagestore") else None,
        additional=tuple(ais),
        path=path,
    )


def load_config(path: str | os.PathLike | None = None) -> StorageConfig:
    """The storage.conf at `path`, `$CONTAINERS_STORAGE_CONF` or the system one (defaults if none).

    An explicitly named file (argument or environment) that does not exist is an error; a missing
    system file is not (c/storage then uses its built-in defaults).
    """
    explicit = path is not None or bool(os.environ.get("CONTAINERS_STORAGE_CONF"))
    p = os.fspath(path) if path is not None else default_config_path()
    if p is None:
        return StorageConfig(graphroot=DEFAULT_GRAPHROOT, runroot=DEFAULT_RUNROOT)
    try:
        with open(p, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        if explicit:
            raise StoreError(f"containers storage.conf {p} does not exist") from None
        return StorageConfig(graphroot=DEFAULT_GRAPHROOT, runroot=DEFAULT_RUNROOT)
    except OSError as e:
        raise StoreError(f"cannot read containers storage.conf {p}: {e.strerror}") from None
    return parse_config(data, p)


# ==================================================================================================
# the containers-storage: transport reference
# ==================================================================================================

@record
class CStorageRef:
    """`containers-storage:[driver@GRAPHROOT+RUNROOT:options]REF` split into its parts."""

    ref: str
    graphroot: str | None = None
    runroot: str | None = None
    driver: str | None = None


def parse_spec(spec: str) -> CStorageRef:
    """Parse a `containers-storage:` reference; the transport prefix is optional.

    Accepted store parts (skopeo/c/image syntax): `[GRAPHROOT]`, `[GRAPHROOT+RUNROOT]`,
    `[driver@GRAPHROOT]`, `[driver@GRAPHROOT+RUNROOT]`, optionally followed by `:options` after the
    runroot (options are ignored: they tune mounting, which is never done here).
    """
    rest = spec[len(TRANSPORT):] if spec.startswith(TRANSPORT) else spec
    graphroot = runroot = driver = None
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise StoreError(f"{spec!r}: missing ']' after the store specification")
        inner, rest = rest[1:end], rest[end + 1:]
        at = inner.find("@")
        if at >= 0 and "/" not in inner[:at]:
            driver, inner = inner[:at] or None, inner[at + 1:]
        plus = inner.find("+")
        if plus >= 0:
            graphroot, runroot = inner[:plus], inner[plus + 1:]
            colon = runroot.find(":")
            if colon >= 0:
                runroot = runroot[:colon]
            runroot = runroot or None
        else:
            graphroot = inner
        if not graphroot or not os.path.isabs(graphroot):
            raise StoreError(f"{spec!r}: the graph root in [...] must be an absolute path")
        if runroot is not None and not os.path.isabs(runroot):
            raise StoreError(f"{spec!r}: the run root in [...] must be an absolute path")
    if not rest:
        raise StoreError(f"{spec!r}: no image name or id")
    return CStorageRef(ref=rest, graphroot=graphroot, runroot=runroot, driver=driver)


# ==================================================================================================
# paths inside a graph root: every component the store controls is opened without following symlinks
# ==================================================================================================

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_NOFOLLOW = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC


def _parts(rel: str) -> list[str]:
    parts = [p for p in rel.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise StoreError(f"bad path {rel!r} inside a containers store")
    return parts


def _refuse(graphroot: str, rel: str, e: OSError) -> OSError:
    """The error for a failed no-follow open: a symlink (ELOOP/ENOTDIR on one) is refused loudly."""
    if e.errno in (errno.ELOOP, errno.ENOTDIR):
        return StoreError(f"{os.path.join(graphroot, rel)}: a symbolic link or not a directory where "
                          "containers/storage keeps a real one; refusing to follow it")
    return e


def open_parent(graphroot: str, rel: str) -> tuple[int, str]:
    """(fd of the directory holding `graphroot/rel`, last component); no component below the graph
    root is followed if it is a symlink.  The graph root itself (the user's choice) may be one.

    Raises FileNotFoundError if a component is missing, StoreError if one is a symlink."""
    parts = _parts(rel)
    try:
        fd = os.open(graphroot, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise StoreError(f"cannot open containers store {graphroot}: {e.strerror}") from None
    try:
        for i, part in enumerate(parts[:-1]):
            try:
                nfd = os.open(part, _DIR_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                raise _refuse(graphroot, "/".join(parts[:i + 1]), e) from None
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd, parts[-1]


def open_in_store(graphroot: str, rel: str, *, directory: bool = False) -> int:
    """fd of `graphroot/rel` (a regular file, or a directory if `directory`), never following a
    symlink below the graph root.  FileNotFoundError if missing; StoreError if a symlink or of the
    wrong type (a FIFO there would otherwise block the read)."""
    pfd, name = open_parent(graphroot, rel)
    kind = "directory" if directory else "regular file"
    try:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)   # (never open a planted device)
        if stat.S_ISLNK(st.st_mode):
            raise _refuse(graphroot, rel, OSError(errno.ELOOP, "symlink"))
        if not (stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)):
            raise StoreError(f"{os.path.join(graphroot, rel)}: not a {kind}")
        flags = _DIR_NOFOLLOW if directory else os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC
        try:
            fd = os.open(name, flags, dir_fd=pfd)
        except OSError as e:
            raise _refuse(graphroot, rel, e) from None
    finally:
        os.close(pfd)
    fst = os.fstat(fd)
    if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise StoreError(f"{os.path.join(graphroot, rel)}: replaced while it was opened")
    if not directory:
        os.set_blocking(fd, True)
    return fd


def read_store_file(graphroot: str, rel: str) -> bytes | None:
    """The bytes of `graphroot/rel` (None if it does not exist), opened as `open_in_store` does."""
    try:
        fd = open_in_store(graphroot, rel)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StoreError(f"cannot read {os.path.join(graphroot, rel)}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "rb", closefd=True) as f:
            return f.read()
    except OSError as e:
        raise StoreError(f"cannot read {os.path.join(graphroot, rel)}: {e.strerror}") from None



# ==================================================================================================
# locks (POSIX record locks: one fd per lock file per process, or a close elsewhere drops the lock)
# ==================================================================================================

class _LockTable:
    """Process-wide shared read locks on c/storage lock files, reference counted per inode.

    fcntl locks belong to the process and are dropped when ANY fd of the file is closed, so nested
    readers in one process must share one fd per lock file and never open a second one.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held: dict[tuple[int, int], list[int]] = {}   # (dev, ino) -> [fd, count]

    def acquire(self, path: str, root: str | None = None) -> tuple[int, int] | None:
        # The mutex is held across open + lockf so no thread ever opens (and later closes) a second
        # fd of a file that is already locked here.  It may wait for a c/storage writer meanwhile.
        # With `root`, `path` is inside that graph root and no component below it is followed.
        if root is not None:
            rel = os.path.relpath(path, root)
        else:
            root, rel = os.path.split(path)
        with self._mutex:
            try:
                pfd, name = open_parent(root, rel)
            except FileNotFoundError:
                return None    # no lock file: nobody writes this store through c/storage
            except OSError as e:
                raise StoreError(f"cannot open the directory of lock file {path}: {e.strerror}") from None
            try:
                try:
                    st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                except FileNotFoundError:
                    return None
                except OSError as e:
                    raise StoreError(f"cannot stat lock file {path}: {e.strerror}") from None
                if not stat.S_ISREG(st.st_mode):
                    raise StoreError(f"lock file {path} is not a regular file (a symlink?); refusing it")
                key = (st.st_dev, st.st_ino)
                held = self._held.get(key)
                if held is not None:
                    held[1] += 1
                    return key
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC, dir_fd=pfd)
                except OSError as e:
                    raise StoreError(f"cannot open lock file {path}: {e.strerror}") from None
            finally:
                os.close(pfd)
            try:
                fst = os.fstat(fd)
                if (fst.st_dev, fst.st_ino) != key:
                    raise StoreError(f"lock file {path} was replaced while opening it")
                posix_read_lock(fd)
            except OSError as e:
                os.close(fd)
                raise StoreError(f"cannot take a read lock on {path}: {e.strerror}") from None
            except BaseException:
                os.close(fd)
                raise
            self._held[key] = [fd, 1]
            return key

    def release(self, key: tuple[int, int] | None) -> None:
        if key is None:
            return
        with self._mutex:
            held = self._held[key]
            held[1] -= 1
            if held[1] == 0:
                del self._held[key]
                os.close(held[0])   # drops the lock

    def held(self) -> int:
        """How many lock files this process holds (for tests)."""
        with self._mutex:
            return len(self._held)


_LOCKS = _LockTable()


@contextmanager
def read_lock(path: str | os.PathLike, root: str | None = None) -> Iterator[None]:
    """Hold a shared POSIX lock on a c/storage lock file (never creating or writing it); with `root`
    (the graph root holding it) no path component below the root is followed if it is a symlink."""
    key = _LOCKS.acquire(os.fspath(path), root)
    try:
        yield
    finally:
        _LOCKS.release(key)


# ==================================================================================================
# layers.json / images.json
# ==================================================================================================

@record
class IDMap:
    """One uidmap/gidmap entry of a c/storage layer."""

    container_id: int
    host_id: int
    size: int


@record
class CLayer:
    """One entry of a store's layers.json."""

    id: str
    parent: str | None
    diff_id: str | None                 # "sha256:<hex>" (layers.json diff-digest)
    compressed_digest: str | None
    compressed_size: int | None
    diff_size: int | None
    created: str | None
    names: tuple[str, ...]
    uidmap: tuple[IDMap, ...]
    gidmap: tuple[IDMap, ...]
    incomplete: bool
    graphroot: str                      # the store that holds it

    @property
    def layer_dir(self) -> str:
        return os.path.join(self.graphroot, "overlay", self.id)

    @property
    def diff_dir(self) -> str:
        return os.path.join(self.layer_dir, "diff")


@record
class CImage:
    """One entry of a store's images.json."""

    id: str
    names: tuple[str, ...]
    top_layer: str | None
    digest: str | None
    digests: tuple[str, ...]
    created: str | None
    big_data_names: tuple[str, ...]
    graphroot: str


def bigdata_filename(key: str) -> str:
    """The file name c/storage gives an image's big-data item `key`."""
    if re.fullmatch(r"[0-9a-z.]*", key):
        return key
    return "=" + base64.b64encode(key.encode("utf-8")).decode("ascii")


def _load_json_list(graphroot: str, rel: str, lock: str) -> list[dict[str, Any]]:
    path = os.path.join(graphroot, rel)
    with read_lock(lock, graphroot):
        data = read_store_file(graphroot, rel)
    if data is None or not data.strip():
        return []
    doc = _json_doc(data, path)
    if not isinstance(doc, list) or not all(isinstance(e, dict) for e in doc):
        raise FormatError(f"{path}: expected a JSON list of objects")
    return doc


def _json_doc(data: bytes, where: str) -> Any:
    """Parsed JSON; bad or absurdly nested input (RecursionError in the parser) is a FormatError."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:   # JSONDecodeError is a ValueError
        raise FormatError(f"{where}: not valid JSON: {e}") from None
    except RecursionError:
        raise FormatError(f"{where}: JSON nested too deeply") from None


def _field(e: dict[str, Any], key: str, kind: type, where: str) -> Any:
    """`e[key]` if it has the JSON type c/storage writes (None if absent or null), else FormatError."""
    v = e.get(key)
    if v is None:
        return None
    if not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):
        raise FormatError(f"{where}: {key!r} has the wrong JSON type ({type(v).__name__})")
    return v


def _str_list(e: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    v = _field(e, key, list, where) or ()
    if not all(isinstance(x, str) for x in v):
        raise FormatError(f"{where}: {key!r} must be a list of strings")
    return tuple(v)


def _idmaps(entries: Any, where: str) -> tuple[IDMap, ...]:
    if not entries:
        return ()
    if not isinstance(entries, list):
        raise FormatError(f"{where}: uidmap/gidmap must be a list")
    out = []
    for e in entries:
        vals = [e.get(k) if isinstance(e, dict) else None for k in ("container_id", "host_id", "size")]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in vals):
            raise FormatError(f"{where}: bad uidmap/gidmap entry")
        out.append(IDMap(*vals))
    return tuple(out)


def _str_or_none(e: dict[str, Any], key: str, where: str) -> str | None:
    return _field(e, key, str, where) or None


def _int_or_none(e: dict[str, Any], key: str, where: str) -> int | None:
    v = _field(e, key, int, where)
    return v if v is not None and v >= 0 else None


class CStore:
    """One c/storage graph root (primary, imagestore or additional image store), read-only."""

    def __init__(self, graphroot: str | os.PathLike):
        self.graphroot = os.path.abspath(os.fspath(graphroot))
        self._layers: dict[str, CLayer] | None = None
        self._images: list[CImage] | None = None

    def __repr__(self) -> str:
        return f"CStore({self.graphroot!r})"

    # lock files ------------------------------------------------------------------------------------
    @property
    def layers_lock(self) -> str:
        return os.path.join(self.graphroot, "overlay-layers", "layers.lock")

    @property
    def images_lock(self) -> str:
        return os.path.join(self.graphroot, "overlay-images", "images.lock")

    # JSON ------------------------------------------------------------------------------------------
    def reload(self) -> None:
        """Forget cached JSON (the next access re-reads it under the read locks)."""
        self._layers = None
        self._images = None

    def layers(self) -> dict[str, CLayer]:
        if self._layers is None:
            path = os.path.join(self.graphroot, "overlay-layers", "layers.json")
            out: dict[str, CLayer] = {}
            for e in _load_json_list(self.graphroot, "overlay-layers/layers.json", self.layers_lock):
                lid = e.get("id")
                if not isinstance(lid, str) or not is_hex(lid, 64):
                    raise FormatError(f"{path}: bad layer id {lid!r}")
                where = f"{path}: layer {lid}"
                flags = _field(e, "flags", dict, where) or {}
                out[lid] = CLayer(
                    id=lid,
                    parent=_str_or_none(e, "parent", where),
                    diff_id=_str_or_none(e, "diff-digest", where),
                    compressed_digest=_str_or_none(e, "compressed-diff-digest", where),
                    compressed_size=_int_or_none(e, "compressed-size", where),
                    diff_size=_int_or_none(e, "diff-size", where),
                    created=_str_or_none(e, "created", where),
                    names=_str_list(e, "names", where),
                    uidmap=_idmaps(e.get("uidmap"), where),
                    gidmap=_idmaps(e.get("gidmap"), where),
                    incomplete=bool(flags.get("incomplete")),
                    graphroot=self.graphroot,
                )
            self._layers = out
        return self._layers

    def images(self) -> list[CImage]:
        if self._images is None:
            path = os.path.join(self.graphroot, "overlay-images", "images.json")
            out: list[CImage] = []
            for e in _load_json_list(self.graphroot, "overlay-images/images.json", self.images_lock):
                iid = e.get("id")
                if not isinstance(iid, str) or not is_hex(iid, 64):
                    raise FormatError(f"{path}: bad image id {iid!r}")
                where = f"{path}: image {iid}"
                digest = _str_or_none(e, "digest", where)
                digests = _str_list(e, "digests", where) or ((digest,) if digest else ())
                out.append(CImage(
                    id=iid,
                    names=_str_list(e, "names", where),
                    top_layer=_str_or_none(e, "layer", where),
                    digest=digest,
                    digests=digests,
                    created=_str_or_none(e, "created", where),
                    big_data_names=_str_list(e, "big-data-names", where),
                    graphroot=self.graphroot,
                ))
            self._images = out
        return self._images

    def big_data(self, image: CImage, key: str) -> bytes | None:
        """The big-data item `key` of `image` (None if the image has no such item)."""
        name = bigdata_filename(key)
        if name in ("", ".", ".."):
            return None
        with read_lock(self.images_lock, self.graphroot):
            return read_store_file(self.graphroot, f"overlay-images/{image.id}/{name}")


# ==================================================================================================
# image names (podman's normalisation) and the multi-store view
# ==================================================================================================

def _split_name(name: str) -> tuple[str | None, str, str | None, str | None]:
    """`[domain/]path[:tag][@digest]` -> (domain, path, tag, digest)."""
    digest = None
    if "@" in name:
        name, digest = name.split("@", 1)
    tag = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    domain = None
    first, sep, remainder = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        domain, name = first, remainder
    return domain, name, tag, digest


def _repository(name: str) -> str:
    """A name without its tag and digest."""
    name = name.split("@", 1)[0]
    slash, colon = name.rfind("/"), name.rfind(":")
    return name[:colon] if colon > slash else name


def name_candidates(ref: str) -> list[str]:
    """Fully qualified names podman would try for `ref`, most specific first.

    `foo` -> `localhost/foo:latest`; `foo:tag` -> `localhost/foo:tag`; `quay.io/a/b` ->
    `quay.io/a/b:latest`; `docker.io/foo` -> `docker.io/library/foo:latest`.  A name with a digest
    keeps it (`name@sha256:...`).
    """
    domain, path, tag, digest = _split_name(ref)
    if not path:
        return []
    suffix = ("@" + digest) if digest else (":" + (tag or "latest"))
    if domain is None:
        return [f"localhost/{path}{suffix}"]
    if domain == "docker.io" and "/" not in path:
        path = "library/" + path
    return [f"{domain}/{path}{suffix}"]


class CStorage:
    """A primary c/storage store plus its additional image stores, in lookup order."""

    def __init__(self, graphroots: Sequence[str | os.PathLike]):
        if not graphroots:
            raise StoreError("no containers storage graph root given")
        seen: set[str] = set()
        self.stores: list[CStore] = []
        for g in graphroots:
            s = CStore(g)
            if s.graphroot not in seen:
                seen.add(s.graphroot)
                self.stores.append(s)

    @classmethod
    def from_config(cls, config: StorageConfig) -> CStorage:
        if config.driver not in ("overlay", "overlay2", ""):
            raise StoreError(f"containers storage driver {config.driver!r} is not supported "
                             "(only overlay stores can be read directly)")
        roots = ([config.imagestore] if config.imagestore else []) + [config.graphroot]
        return cls(roots + list(config.additional))

    @classmethod
    def open(cls, ref: CStorageRef | None = None,
             storage_conf: str | os.PathLike | None = None) -> CStorage:
        """The stores for a parsed reference: its [GRAPHROOT] (if any) overrides storage.conf's, whose
        additional image stores still apply (as in c/image)."""
        config = load_config(storage_conf)
        if ref is not None and ref.graphroot:
            config = StorageConfig(graphroot=ref.graphroot, runroot=ref.runroot or config.runroot,
                                   driver=ref.driver or config.driver, imagestore=None,
                                   additional=config.additional, path=config.path)
        elif ref is not None and ref.driver:
            config = StorageConfig(config.graphroot, config.runroot, ref.driver, config.imagestore,
                                   config.additional, config.path)
        return cls.from_config(config)

    def reload(self) -> None:
        for s in self.stores:
            s.reload()

    @contextmanager
    def reading(self) -> Iterator[CStorage]:
        """Hold read locks on every store (layers.lock of each, then images.lock of each: c/storage
        takes layer locks before image locks) and re-read the JSON inside."""
        with ExitStack() as stack:
            for s in self.stores:
                stack.enter_context(read_lock(s.layers_lock, s.graphroot))
            for s in self.stores:
                stack.enter_context(read_lock(s.images_lock, s.graphroot))
            self.reload()
            yield self

    def _searched(self) -> str:
        return ", ".join(s.graphroot for s in self.stores)

    # layers ----------------------------------------------------------------------------------------
    def layer(self, layer_id: str) -> CLayer:
        """A layer by id: primary first, then each additional image store in order."""
        for s in self.stores:
            layer = s.layers().get(layer_id)
            if layer is not None:
                return layer
        raise NotFoundError(f"layer {layer_id} is in none of the containers stores searched "
                            f"({self._searched()}){_ADD_STORE_HINT}")

    def layer_chain(self, top_id: str | None) -> list[CLayer]:
        """The layers of the chain ending in `top_id`, base first, following `parent` across stores."""
        chain: list[CLayer] = []
        seen: set[str] = set()
        lid = top_id
        while lid:
            if lid in seen:
                raise FormatError(f"layer {lid}: parent chain loops")
            seen.add(lid)
            try:
                layer = self.layer(lid)
            except NotFoundError:
                if chain:
                    raise NotFoundError(f"layer {lid} (parent of {chain[-1].id}) is in none of the "
                                        f"containers stores searched ({self._searched()})"
                                        f"{_ADD_STORE_HINT}") from None
                raise
            chain.append(layer)
            lid = layer.parent
        chain.reverse()
        return chain

    # images ----------------------------------------------------------------------------------------
    def images(self) -> list[CImage]:
        """All images, primary store first; an id present in several stores is listed once."""
        out: list[CImage] = []
        seen: set[str] = set()
        for s in self.stores:
            for img in s.images():
                if img.id not in seen:
                    seen.add(img.id)
                    out.append(img)
        return out

    def _by_exact(self, key: str) -> CImage | None:
        for s in self.stores:
            for img in s.images():
                if img.id == key:
                    return img
            for img in s.images():
                if key in img.names:
                    return img
        return None

    def resolve_image(self, ref: str) -> CImage:
        """An image by name (podman normalisation), `name@digest`, full id or unique id prefix."""
        ref = ref.strip()
        if not ref:
            raise NotFoundError("empty image reference")
        bare = ref[len("sha256:"):] if ref.startswith("sha256:") else ref
        img = self._by_exact(bare) or self._by_exact(ref)
        if img is not None:
            return img
        domain, path, tag, digest = _split_name(ref)
        if digest is not None:
            found = self._by_digest(ref, digest)
            if found is not None:
                return found
        for cand in name_candidates(ref):
            img = self._by_exact(cand)
            if img is not None:
                return img
        if domain is None and digest is None and path:
            # short name: any registry's repository ending in /path with that tag (libimage does this)
            want_tag = tag or "latest"
            matches = {}
            for img in self.images():
                for n in img.names:
                    d, p, t, _ = _split_name(n)
                    if t == want_tag and (p == path or p.endswith("/" + path)):
                        matches.setdefault(img.id, img)
            if len(matches) == 1:
                return next(iter(matches.values()))
            if len(matches) > 1:
                raise NotFoundError(f"short name {ref!r} matches several images: "
                                    f"{', '.join(sorted(matches))}; use a full name")
        if re.fullmatch(r"[0-9a-f]+", bare):
            hits = {img.id: img for img in self.images() if img.id.startswith(bare)}
            if len(hits) == 1:
                return next(iter(hits.values()))
            if len(hits) > 1:
                raise NotFoundError(f"image id prefix {bare!r} is ambiguous "
                                    f"({len(hits)} images match)")
        raise NotFoundError(f"image {ref!r} not found in containers storage "
                            f"({', '.join(s.graphroot for s in self.stores)})")

    def _by_digest(self, ref: str, digest: str) -> CImage | None:
        """`name@digest`: the image with that manifest digest and a name in that repository."""
        hits = [img for img in self.images() if digest in img.digests]
        repo = ref.split("@", 1)[0]
        repos = {repo} | {c.split("@", 1)[0] for c in name_candidates(ref)}
        for img in hits:
            if any(_repository(n) in repos for n in img.names):
                return img
        return None

    def store_of(self, image: CImage) -> CStore:
        for s in self.stores:
            if s.graphroot == image.graphroot:
                return s
        raise NotFoundError(f"image {image.id}: store {image.graphroot} is not open")

    def big_data(self, image: CImage, key: str) -> bytes | None:
        return self.store_of(image).big_data(image, key)

    def image_manifest(self, image: CImage) -> bytes | None:
        return self.big_data(image, "manifest")

    def image_config(self, image: CImage) -> bytes | None:
        """The config JSON bytes: big data `sha256:<id>`, else the one the manifest names."""
        data = self.big_data(image, "sha256:" + image.id)
        if data is not None:
            return data
        manifest = self.image_manifest(image)
        if manifest:
            try:
                digest = json.loads(manifest)["config"]["digest"]
            except (ValueError, KeyError, TypeError, RecursionError):
                digest = None
            if isinstance(digest, str):
                return self.big_data(image, digest)
        return None


# ==================================================================================================
# diff dir -> layer tree
# ==================================================================================================

def _to_container_id(host: int, idmap: Sequence[IDMap], what: str, where: str) -> int:
    if not idmap:
        return host
    for m in idmap:
        if m.host_id <= host < m.host_id + m.size:
            return m.container_id + (host - m.host_id)
    raise LayerError(f"{where}: host {what} {host} is outside the layer's {what} map")


def _normalise_inode(node: Inode, where: str) -> bool:
    """Rewrite one inode's xattrs in place; True if it is an xattr-form whiteout."""
    xattrs: dict[bytes, bytes] = {}
    opaque = False
    xwhiteout = False
    override: bytes | None = None
    for key, value in node.xattrs.items():
        if key.startswith(wh.ESCAPED_OVERLAY_PREFIX):
            real = wh.TRUSTED_OVERLAY_PREFIX + key[len(wh.ESCAPED_OVERLAY_PREFIX):]
            if real == OPAQUE_XATTR:
                raise LayerError(f"{where}: content xattr {real.decode()} cannot be represented "
                                 "(the tree model uses it as the opaque marker)")
            xattrs[real] = value
            continue
        name = wh.overlay_xattr_name(key)
        if name is not None:
            if name == b"opaque":
                opaque = opaque or value == b"y"   # "x" = "has xattr whiteouts", not opaque
            elif name == b"whiteout":
                xwhiteout = True
            elif name in _DEPENDENT_KEYS:
                raise LayerError(f"{where}: overlay {name.decode()} xattr in a diff dir: the "
                                 "layer depends on its lower layers (store written with "
                                 "redirect_dir/metacopy); it cannot be read directly")
            # every other overlay key (origin, impure, nlink, upper, uuid, protattr,
            # dirmeta_delegate, ...) is overlayfs bookkeeping, not content
        else:
            if key == OVERRIDE_STAT:
                override = value
            elif key not in _IGNORED_XATTRS:
                xattrs[key] = value
    node.xattrs = xattrs
    if opaque and node.is_dir:
        wh.make_opaque(node)
    if override is not None:
        _apply_override_stat(node, override, where)
    return xwhiteout and node.is_reg and node.size == 0


def _apply_override_stat(node: Inode, value: bytes, where: str) -> None:
    """c/storage `force_mask`: the real owner and mode live in user.containers.override_stat."""
    try:
        uid_s, gid_s, mode_s = value.decode("ascii").split(":")
        uid, gid, mode = int(uid_s), int(gid_s), int(mode_s, 8)
    except (UnicodeDecodeError, ValueError):
        raise LayerError(f"{where}: bad {OVERRIDE_STAT.decode()} value {value!r}") from None
    if mode & S_IFMT and mode & S_IFMT != node.ftype:
        raise LayerError(f"{where}: {OVERRIDE_STAT.decode()} changes the file type "
                         f"({stat.filemode(node.mode)} -> {stat.filemode(mode)}); not supported")
    node.uid, node.gid = uid, gid
    node.mode = node.ftype | (mode & 0o7777)


def normalise_layer_tree(root: Inode, *, uidmap: Sequence[IDMap] = (), gidmap: Sequence[IDMap] = (),
                         name: str = "layer") -> Inode:
    """Bring a scanned c/storage diff dir to the tree model's whiteout vocabulary, in place.

    - char device 0:0 stays a whiteout; other devices (e.g. 1:3) are real devices and stay;
    - opaque: `trusted.overlay.opaque=y` stays the marker; `user.overlay.opaque=y` (rootless stores)
      becomes it; AUFS `.wh..wh..opq` files (fuse-overlayfs) become it and disappear;
    - AUFS `.wh.<name>` (non-directory) becomes a whiteout `<name>` (mode 0, the file's owner and
      mtime, like c/storage's own unpacker); if `<name>` also exists in the same directory the real
      entry wins; other `.wh..wh.*` names are AUFS bookkeeping and are dropped; a bare `.wh.` or a
      directory named `.wh.*` is an error;
    - xattr whiteouts (`*.overlay.whiteout` on an empty regular file) become whiteouts;
    - overlay bookkeeping xattrs are dropped: every other `trusted.overlay.*` and all `user.overlay.*`
      (origin, impure, nlink, upper, uuid, protattr, dirmeta_delegate, opaque=x, ...).  c/storage's
      own layer export (pkg/archive) agrees: it writes only security.capability, security.ima and
      `user.*` minus `user.overlay.*`, turning the opaque xattr into `.wh..wh..opq`.
      `trusted.overlay.overlay.X` (kernel >= 6.7 escape of a content xattr set through the overlay)
      becomes `trusted.overlay.X`.  `redirect`/`metacopy` mean the diff dir is not self-contained
      (c/storage itself then stops diffing diff dirs natively): LayerError;
    - `security.selinux` (host labelling) is dropped; `user.containers.override_stat` (force_mask)
      is applied to owner and mode and dropped;
    - with a layer uidmap/gidmap, host ids are mapped back to container ids.
    """
    norm = _Normaliser(uidmap, gidmap, name)
    norm.inode(root, b"")
    stack: list[tuple[bytes, Inode]] = [(b"", root)]
    while stack:
        path, node = stack.pop()
        if node.entries is None:
            continue
        norm.entries(node, path)
        for child_name, child in node.entries.items():
            if child.entries is not None:
                stack.append((path + b"/" + child_name, child))
    return root


class _Normaliser:
    """State of one normalise_layer_tree pass: each inode (hardlinks!) is rewritten once."""

    def __init__(self, uidmap: Sequence[IDMap], gidmap: Sequence[IDMap], name: str):
        self.uidmap, self.gidmap, self.name = uidmap, gidmap, name
        self.done: dict[int, bool] = {}     # id(inode) -> is an xattr-form whiteout

    def where(self, path: bytes) -> str:
        return f"{self.name}:{(path or b'/').decode('utf-8', 'backslashreplace')}"

    def inode(self, node: Inode, path: bytes) -> bool:
        key = id(node)
        if key not in self.done:
            where = self.where(path)
            self.done[key] = _normalise_inode(node, where)
            node.uid = _to_container_id(node.uid, self.uidmap, "uid", where)
            node.gid = _to_container_id(node.gid, self.gidmap, "gid", where)
        return self.done[key]

    def entries(self, d: Inode, path: bytes) -> None:
        assert d.entries is not None
        real = {n for n in d.entries if not wh.is_whiteout_name(n)}
        out: dict[bytes, Inode] = {}
        whiteouts: dict[bytes, Inode] = {}
        for n, child in d.entries.items():
            cpath = path + b"/" + n
            xwhiteout = self.inode(child, cpath)
            kind, target = wh.classify_name(n)
            if kind == wh.ENTRY:
                if xwhiteout:
                    whiteouts[n] = Inode.whiteout(uid=child.uid, gid=child.gid, mtime_ns=child.mtime_ns)
                else:
                    out[n] = child
                continue
            if child.is_dir:
                raise LayerError(f"{self.where(cpath)}: a directory named like an AUFS whiteout")
            if kind == wh.OPAQUE:
                d.xattrs[OPAQUE_XATTR] = b"y"
                continue
            if kind == wh.AUFS_META:
                continue        # AUFS internal (.wh..wh.plnk, .wh..wh.aufs): never content
            if kind == wh.INVALID:
                raise LayerError(f"{self.where(cpath)}: invalid whiteout name")
            assert target is not None
            if target in real:
                continue        # a whiteout next to a new entry of the same name: the entry wins
            whiteouts[target] = Inode.whiteout(uid=child.uid, gid=child.gid, mtime_ns=child.mtime_ns)
        # an upper dir says opacity with its own xattr: an entry beside a whiteout only wins
        wh.merge_whiteouts(out, whiteouts, opaque_dirs=False)
        d.entries = out


def read_layer_tree(layer: CLayer, objects: ObjectStore | None = None) -> Inode:
    """Scan a c/storage layer's diff dir (content > 64 bytes into `objects`) and normalise it."""
    if layer.incomplete:
        raise LayerError(f"layer {layer.id} in {layer.graphroot} is incomplete (being created or "
                         "deleted by c/storage)")
    with open_diff_dir(layer) as fd:
        from flatmount.sources.directory import scan_directory

        proc = f"/proc/self/fd/{fd}"
        try:
            root = scan_directory(proc, objects)
        except LayerError as e:   # name the diff dir, not our /proc handle of it
            raise LayerError(str(e).replace(proc, layer.diff_dir)) from None
    return normalise_layer_tree(root, uidmap=layer.uidmap, gidmap=layer.gidmap,
                                name=f"layer {layer.id[:12]}")


@contextmanager
def open_diff_dir(layer: CLayer) -> Iterator[int]:
    """An fd of the layer's `overlay/<id>/diff`, reached without following any symlink below the
    graph root (a diff dir, layer dir or `overlay/` that is a symlink is refused: c/storage never
    makes one, and following it would import whatever it points at)."""
    rel = f"overlay/{layer.id}"
    try:
        composefs = open_in_store(layer.graphroot, f"{rel}/composefs-data/composefs.blob")
    except FileNotFoundError:
        pass
    except StoreError as e:
        raise LayerError(f"layer {layer.id}: {e}") from None
    else:
        os.close(composefs)
        raise LayerError(f"layer {layer.id}: composefs-backed c/storage layers (use_composefs) are "
                         "not supported")
    try:
        fd = open_in_store(layer.graphroot, f"{rel}/diff", directory=True)
    except FileNotFoundError:
        raise LayerError(f"layer {layer.id}: diff directory {layer.diff_dir} is missing") from None
    except StoreError as e:
        raise LayerError(f"layer {layer.id}: {e}") from None
    except OSError as e:
        raise LayerError(f"layer {layer.id}: cannot open {layer.diff_dir}: {e.strerror}") from None
    try:
        yield fd
    finally:
        os.close(fd)


# ==================================================================================================
# pull
# ==================================================================================================

def layer_ids(chain: Sequence[CLayer]) -> list[str]:
    """flatmount layer ids of a c/storage chain (base first), recomputed from the diff_ids."""
    ids: list[str] = []
    parent: str | None = None
    for layer in chain:
        if not layer.diff_id or not is_sha256_digest(layer.diff_id):
            raise LayerError(f"layer {layer.id} in {layer.graphroot} has no usable diff-digest "
                             f"({layer.diff_id!r}); only committed image layers can be imported")
        parent = chain_id(parent, layer.diff_id)
        ids.append(parent)
    return ids


def tarsplit_path(layer: CLayer) -> str:
    """`overlay-layers/<id>.tar-split.gz`, relative to the layer's graph root."""
    return f"overlay-layers/{layer.id}.tar-split.gz"


def read_verified_layer_tree(layer: CLayer, objects: ObjectStore) -> tuple[Inode | None, str]:
    """(tree, "") if the layer's tar-split data and diff dir rebuild a tar stream whose sha256 is its
    `diff-digest`; the tree is then read FROM that stream (flatmount.sources.tarsplit says why).  Else
    (None, why): the caller records the layer as unverified.

    The tree's root directory follows the c/storage rule of `read_layer_tree` (the diff dir's mode,
    owner and mtime; write and set-id bits dropped), so a layer looks the same either way.
    """
    import gzip

    from flatmount.sources.layers import read_tar
    from flatmount.sources.tarsplit import TarSplitStream

    if layer.incomplete:
        raise LayerError(f"layer {layer.id} in {layer.graphroot} is incomplete (being created or "
                         "deleted by c/storage)")
    label = f"layer {layer.id[:12]}"
    try:
        tsfd = open_in_store(layer.graphroot, tarsplit_path(layer))
    except FileNotFoundError:
        return None, f"{label}: no tar-split data"
    except StoreError as e:
        raise LayerError(f"layer {layer.id}: {e}") from None
    except OSError as e:
        return None, f"{label}: cannot open its tar-split data: {e.strerror}"
    with os.fdopen(tsfd, "rb") as raw, open_diff_dir(layer) as dfd:
        stream = TarSplitStream(gzip.GzipFile(fileobj=raw, mode="rb"), dfd, label)
        try:
            tl = read_tar(stream, objects, label=f"{label} (rebuilt from tar-split)")  # type: ignore[arg-type]
        except LayerError as e:       # (flatmount.sources.tarsplit: the stream cannot be rebuilt)
            return None, str(e)
        finally:
            stream.close()
        st = os.fstat(dfd)
    if tl.compression != "none" or tl.diff_id != layer.diff_id:
        return None, (f"{label}: the stream rebuilt from its tar-split data and diff dir has digest "
                      f"{tl.diff_id}, not its diff-digest {layer.diff_id}")
    root = tl.tree
    where = f"{label}:/"
    root.mode = S_IFDIR | (st.st_mode & 0o755)
    root.uid = _to_container_id(st.st_uid, layer.uidmap, "uid", where)
    root.gid = _to_container_id(st.st_gid, layer.gidmap, "gid", where)
    root.mtime_ns = st.st_mtime_ns
    return root, ""


def pull_cstorage(store: Store, spec: str, name: str | None = None, *,
                  storage_conf: str | os.PathLike | None = None) -> ImageRecord:
    """Import a containers-storage image into `store`, all or nothing.

    Each layer is verified first: rebuilt from its tar-split data and diff dir, hashed against its
    claimed diff_id and, if that matches, read from the rebuilt stream (`read_verified_layer_tree`)
    and recorded under the id any verified import gives it (`flatmount.store.records.chain_id`).  A layer
    that cannot be verified (no or mismatching tar-split data, e.g. partial zstd:chunked pulls or a
    tampered diff dir) is read from its diff dir and recorded under `unverified_chain_id`: no pull
    that verifies digests ever reuses it, and fsck lists it.  Layers already recorded in `store`
    (primary or any additional store) under the id they would get are not read again; a verified
    record is preferred to an unverified one.  The image is recorded with its config bytes (which
    must hash to the image id), manifest and names (its c/storage names plus `name`, if given).
    The c/storage read locks are held until the commit (`flatmount.store.batch.ImportBatch`).
    """
    from flatmount.progress import step
    from flatmount.store.batch import ImportBatch
    from flatmount.store.records import unverified_chain_id

    ref = parse_spec(spec)
    cs = CStorage.open(ref, storage_conf)
    with cs.reading():
        image = cs.resolve_image(ref.ref)
        chain = cs.layer_chain(image.top_layer)
        layer_ids(chain)            # every layer has a usable diff-digest
        config = cs.image_config(image)
        if config is not None:
            import hashlib

            if hashlib.sha256(config).hexdigest() != image.id:
                raise FormatError(f"image {image.id[:12]} in {image.graphroot}: its config's sha256 is "
                                  "not its id (the store's image data was changed)")
            if not isinstance(_json_doc(config, f"image {image.id[:12]} config"), dict):
                raise FormatError(f"image {image.id[:12]} in {image.graphroot}: its config is not a "
                                  "JSON object")
        manifest = cs.image_manifest(image)
        names = list(image.names)
        if name and name not in names:
            names.append(name)
        with ImportBatch(store) as batch:
            parent: str | None = None
            for k, layer in enumerate(chain):
                diff_id = str(layer.diff_id)
                vid = chain_id(parent, diff_id)
                if batch.has_layer(vid):
                    parent = vid
                    continue
                step(f"containers-storage: reading layer {vid[:12]}", k, len(chain))
                tree, _why = read_verified_layer_tree(layer, batch.objects)
                if tree is not None:
                    lid, verified = vid, True
                else:
                    lid, verified = unverified_chain_id(parent, diff_id), False
                    if batch.has_layer(lid):
                        parent = lid
                        continue
                    tree = read_layer_tree(layer, batch.objects)
                batch.add_layer(tree, parent=parent, diff_id=diff_id, layer_id=lid, verified=verified,
                                compressed_digest=layer.compressed_digest,
                                compressed_size=layer.compressed_size,
                                diff_size=layer.diff_size, created=layer.created)
                parent = lid
            batch.set_image(image.id, parent, config=config, manifest=manifest, names=names,
                            created=image.created)
            record = batch.commit()
    assert record is not None
    return record
