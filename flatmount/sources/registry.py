"""`pull docker://...` and every other skopeo transport, streamed through skopeo's image proxy.

Why this shape: the proxy (flatmount.sources.imageproxy) resolves the reference (registries, auth, TLS,
multi-arch indexes, archives) and hands each blob over as a pipe; each layer blob streams from that
pipe through decompression and the digest checks into the same importer `oci:` uses
(flatmount.sources.layers.read_tar + verify, flatmount.store.batch.ImportBatch), with no temporary copy.

Order: manifest, then the config blob (its sha256 is checked: it is the image id), whose diff_ids
give the layer ids; layers whose id is already in the primary or an additional store are not
fetched at all.  The others are fetched `jobs` at a time, one proxy process per concurrent blob (a
proxy streams one blob at a time, see flatmount.sources.imageproxy); each extra proxy opens the image by
its manifest digest (for docker: references), so all of them read the same image.

Failure: any error (registry down, 401, digest mismatch, a blob cut off, Ctrl-C) stops every fetch,
kills the proxies, and the ImportBatch records nothing.  Layers that had completed are kept for a
re-pull: their objects stay in the primary store (unreferenced, so `gc` may remove them after its
grace period) and their layer image is kept in the runtime dir (`<runroot>/pull-partial/`, outside
the store); a re-pull of an image with such a layer uses it when every object it names is still
there, instead of fetching it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable

from flatmount.errors import DigestMismatchError, FlatmountError, LayerError, RegistryError
from flatmount.record import record
from objects.paths import is_hex, is_sha256_digest

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: CLI start-up, see objects/lazy.py)

if TYPE_CHECKING:  # pragma: no cover
    from typing import Any

    from flatmount.sources.imageproxy import Proxy
    from flatmount.sources.oci import Descriptor
    from flatmount.store.batch import ImportBatch, PullResult
    from flatmount.store.core import Store

# skopeo's transports (containers/image alltransports); oci:, dir: and containers-storage: are read
# by flatmount itself (flatmount.pull), `skopeo-oci:` etc. would not be a name of skopeo's
TRANSPORTS = ("docker", "docker-archive", "oci-archive", "docker-daemon", "sif", "tarball", "ostree")
DEFAULT_JOBS = 3
Events = Callable[[dict], None]
_PARTIAL_DIR = "pull-partial"


@record
class RegistryOptions:
    """Options as skopeo and podman spell them (see `flatmount pull --help`)."""

    authfile: str | None = None
    creds: str | None = None
    tls_verify: bool | None = None
    cert_dir: str | None = None
    platform: str | None = None        # os/arch[/variant]
    jobs: int = DEFAULT_JOBS
    digestfile: str | None = None
    skopeo: str = "skopeo"

    def proxy_args(self) -> tuple[list[str], list[str]]:
        """(global args, image args) of `skopeo [global] experimental-image-proxy [image]`."""
        glob: list[str] = []
        conf = os.environ.get("CONTAINERS_REGISTRIES_CONF")
        if conf:  # skopeo 1.9 does not read this variable itself: the same file for both of us
            glob += ["--registries-conf", conf]
        if self.platform:
            parts = self.platform.split("/")
            if len(parts) not in (2, 3) or not all(re.fullmatch(r"[a-z0-9_.-]+", p) for p in parts):
                raise RegistryError(f"--platform {self.platform!r}: expected os/arch[/variant], e.g. linux/arm64")
            glob += ["--override-os", parts[0], "--override-arch", parts[1]]
            if len(parts) == 3:
                glob += ["--override-variant", parts[2]]
        img: list[str] = []
        if self.authfile:
            if not os.path.isfile(self.authfile):
                raise RegistryError(f"--authfile {self.authfile}: no such file")
            img += ["--authfile", self.authfile]
        if self.creds:
            img += ["--creds", self.creds]
        if self.tls_verify is not None:
            img.append(f"--tls-verify={'true' if self.tls_verify else 'false'}")
        if self.cert_dir:
            if not os.path.isdir(self.cert_dir):
                raise RegistryError(f"--cert-dir {self.cert_dir}: no such directory")
            img += ["--cert-dir", self.cert_dir]
        return glob, img


def is_transport_ref(source: str) -> bool:
    """Whether `source` names one of skopeo's transports that flatmount reads through the proxy."""
    return any(source.startswith(t + ":") for t in TRANSPORTS)


def _repo_of(docker_ref: str) -> str:
    """`//host/repo:tag` or `//host/repo@sha256:...` -> `//host/repo`."""
    ref = docker_ref.split("@", 1)[0]
    head, _, last = ref.rpartition("/")
    if ":" in last:
        last = last.split(":", 1)[0]
    return f"{head}/{last}" if head else last


def default_name(transport: str, rest: str) -> str | None:
    """The name podman gives an image pulled from this reference (None: no name)."""
    if transport == "docker":
        name = rest.removeprefix("//")
        return name or None
    if transport in ("oci-archive", "docker-archive"):
        # FILE:REF - a reference after the path names the image
        path, sep, ref = rest.partition(":")
        return ref if sep and ref and not ref.startswith("@") else None
    return None


# --- short names (registries.conf, resolved as podman does) --------------------------------------

_REF = re.compile(r"[a-z0-9]+(?:[._-]+[a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
                  r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?")


def looks_like_reference(source: str) -> bool:
    """A bare image reference (`alpine`, `library/alpine:3`, `quay.io/x/y@sha256:...`), not a path."""
    return bool(_REF.fullmatch(source)) and not source.startswith(".")


def is_qualified(ref: str) -> bool:
    """Fully qualified: its first component names a registry (has `.` or `:`, or is localhost)."""
    first, sep, _ = ref.partition("/")
    return bool(sep) and ("." in first or ":" in first or first == "localhost")


def registries_conf_paths() -> list[str]:
    """registries.conf files in the order containers/image reads them (later ones override)."""
    env = os.environ.get("CONTAINERS_REGISTRIES_CONF")
    if env:
        return [env]
    main = "/etc/containers/registries.conf"
    if os.geteuid() != 0:
        user = os.path.join(os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"),
                            "containers", "registries.conf")
        if os.path.isfile(user):
            main = user
    out = [main]
    dropins = main + ".d"
    with contextlib.suppress(OSError):
        out += sorted(os.path.join(dropins, n) for n in os.listdir(dropins) if n.endswith(".conf"))
    return out


@record
class SearchConfig:
    registries: tuple[str, ...]
    aliases: dict
    mode: str  # enforcing, permissive, disabled


def load_search_config(paths: list[str] | None = None) -> SearchConfig:
    """unqualified-search-registries, [aliases] and short-name-mode from registries.conf (+ drop-ins)."""
    import tomllib

    registries: list[str] | None = None
    aliases: dict[str, str] = {}
    mode = "enforcing"
    for path in paths if paths is not None else registries_conf_paths():
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError:
            continue
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise RegistryError(f"{path}: cannot read registries.conf ({e})") from None
        regs = doc.get("unqualified-search-registries")
        if regs is None:  # the v1 format
            regs = (doc.get("registries") or {}).get("search", {}).get("registries") \
                if isinstance(doc.get("registries"), dict) else None
        if isinstance(regs, list):
            registries = [str(r) for r in regs]
        if isinstance(doc.get("aliases"), dict):
            aliases.update({str(k): str(v) for k, v in doc["aliases"].items()})
        if isinstance(doc.get("short-name-mode"), str) and doc["short-name-mode"]:
            mode = doc["short-name-mode"]
    return SearchConfig(tuple(registries or ()), aliases, mode)


def resolve_short_name(name: str, *, config: SearchConfig | None = None, tty: bool | None = None,
                       ask: Callable[[str], str] = input) -> list[str]:
    """The docker:// references to try for a bare reference, in order (podman's short-name rules)."""
    if is_qualified(name):
        return ["docker://" + name]
    config = config or load_search_config()
    base, suffix = name, ""
    if "@" in base:
        base, at, digest = base.partition("@")
        suffix = at + digest
    last = base.rsplit("/", 1)[-1]
    if ":" in last:
        base, _, tag = base.rpartition(":")
        suffix = ":" + tag + suffix
    if base in config.aliases:
        target = config.aliases[base]
        if suffix:  # the user's tag or digest replaces the alias's own
            target = target.split("@", 1)[0]
            if ":" in target.rsplit("/", 1)[-1]:
                target = target.rsplit(":", 1)[0]
        return ["docker://" + target + suffix]
    if not suffix:
        suffix = ":latest"
    candidates = [f"{r}/{base}{suffix}" for r in config.registries]
    if not candidates:
        raise RegistryError(f"{name!r} is no path here, and as an image short name it has no alias and "
                            "registries.conf no unqualified-search-registries: give a path or a full name "
                            f"(e.g. docker.io/library/{name})")
    if len(candidates) == 1 or config.mode in ("permissive", "disabled"):
        return ["docker://" + c for c in candidates]
    if tty is None:
        tty = sys.stdin.isatty() and sys.stdout.isatty()
    if not tty:
        raise RegistryError(f"short name {name!r} is ambiguous (short-name-mode {config.mode}, no terminal "
                            f"to ask): give one of {', '.join(candidates)}")
    for k, c in enumerate(candidates, 1):
        print(f"  {k}) {c}", file=sys.stderr)
    answer = ask(f"Pick an image for {name!r} [1-{len(candidates)}]: ").strip()
    if not answer.isdigit() or not 1 <= int(answer) <= len(candidates):
        raise RegistryError(f"short name {name!r}: no image picked")
    return ["docker://" + candidates[int(answer) - 1]]


def pull_short_name(store: Store, name: str, image_name: str | None = None, *,
                    options: RegistryOptions | None = None, events: Events | None = None) -> PullResult:
    """Resolve a bare reference (see `resolve_short_name`) and pull the first candidate that exists."""
    errors = []
    for ref in (candidates := resolve_short_name(name)):
        try:
            return pull_transport(store, ref, image_name, options=options, events=events)
        except RegistryError as e:
            if len(candidates) == 1:
                raise
            errors.append(str(e))
    raise RegistryError(f"{name}: no candidate could be pulled: " + "; ".join(errors))


def _clean_error(message: str, ref: str) -> str:
    """skopeo's message, on one line, with a hint for the common causes."""
    one = " ".join(message.split())
    low = one.lower()
    hint = ""
    # a 401 status, not those digits in an address (port 40105) or a digest
    if "unauthorized" in low or "authentication required" in low or re.search(r"(?<![\w.:/@-])401\b", low):
        hint = " (check --creds or --authfile)"
    elif "connection refused" in low or "no such host" in low or "i/o timeout" in low:
        hint = " (is the registry up and its address right?)"
    elif "x509" in low or "certificate" in low:
        hint = " (give the registry's CA with --cert-dir, or --tls-verify=false)"
    elif "http response to https client" in low:
        hint = " (a plain-HTTP registry: use --tls-verify=false)"
    return f"{ref}: {one}{hint}"


class _Cancelled(Exception):
    pass


def pull_transport(store: Store, source: str, name: str | None = None, *,
                   options: RegistryOptions | None = None, events: Events | None = None) -> PullResult:
    """Import the image at a skopeo reference (`docker://...`, `oci-archive:...`) into the primary store."""
    from flatmount.sources.imageproxy import Proxy

    options = options or RegistryOptions()
    if options.jobs < 1:
        raise RegistryError("--jobs must be at least 1")
    if options.digestfile:
        from flatmount.safepath import check_output

        check_output(options.digestfile)   # before fetching anything; again when it is written
    transport, _, rest = source.partition(":")
    glob, img_args = options.proxy_args()
    emit = events or (lambda _e: None)
    proxies: list[Proxy] = []
    try:
        first = Proxy(glob, img_args, options.skopeo)
        proxies.append(first)
        # the helpers for concurrent fetches start now, beside the first one's work (~0.1 s each)
        # (docker: only; another transport is local, and each proxy of an archive unpacks all of it)
        jobs = options.jobs if transport == "docker" else 1
        spare = [Proxy(glob, img_args, options.skopeo) for _ in range(jobs - 1)]
        proxies.extend(spare)
        first.initialize()
        try:
            image = first.open_image(source)
        except RegistryError as e:
            raise RegistryError(_clean_error(str(e), source)) from None
        return _pull(store, source, transport, rest, name, options, emit, proxies, image)
    except BaseException as e:
        if transport == "docker":  # nothing to clean up in a killed registry proxy: stop it now
            for p in proxies:
                p.kill()
        if isinstance(e, KeyboardInterrupt):
            raise RegistryError(f"{source}: pull interrupted; nothing was recorded (pull again to "
                                "resume)") from None
        raise
    finally:
        for p in proxies:  # all told to exit first, then reaped: they wind down together
            p.shutdown()
        for p in proxies:
            p.close()


def _pull(store: Store, source: str, transport: str, rest: str, name: str | None, options: RegistryOptions,
          emit: Events, proxies: list[Proxy], image: int) -> PullResult:
    from flatmount.sources.oci import MAX_JSON, MT_CONFIG, MT_MANIFEST, Descriptor, _parse_json, image_layers
    from flatmount.store.batch import ImportBatch, PullResult

    first = proxies[0]
    try:
        mdigest, mbytes = first.read_small("GetManifest", image, limit=MAX_JSON)
    except RegistryError as e:
        raise RegistryError(_clean_error(str(e), source)) from None
    manifest = _parse_json(mbytes, f"{source} manifest")
    if manifest.get("mediaType", MT_MANIFEST[0]) not in MT_MANIFEST:
        raise LayerError(f"{source}: unsupported manifest media type {manifest.get('mediaType')!r}")
    if not isinstance(mdigest, str) or not is_sha256_digest(mdigest):
        raise RegistryError(f"{source}: the proxy gave no valid manifest digest ({mdigest!r})")
    emit({"event": "manifest", "digest": mdigest})
    cdesc = Descriptor.parse(manifest.get("config"), f"{source} manifest config")
    if cdesc.media_type not in MT_CONFIG:
        raise LayerError(f"{source}: unsupported config media type {cdesc.media_type!r}")
    if not cdesc.digest.startswith("sha256:") or cdesc.size > MAX_JSON:
        raise LayerError(f"{source}: config {cdesc.digest} must be sha256 and at most {MAX_JSON} bytes")
    try:
        if "sha256:" + hashlib.sha256(mbytes).hexdigest() == mdigest:
            with first.get_blob(image, cdesc.digest, cdesc.size) as stream:
                config_bytes = stream.read_all(MAX_JSON)
        else:
            # a Docker schema 2 manifest the proxy converted to OCI: its config was converted too and
            # is no blob of the source; the proxy's GetFullConfig gives the same bytes (checked below)
            config_bytes = first.read_small("GetFullConfig", image, limit=MAX_JSON)[1]
    except RegistryError as e:
        raise RegistryError(_clean_error(str(e), source)) from None
    if len(config_bytes) != cdesc.size or "sha256:" + hashlib.sha256(config_bytes).hexdigest() != cdesc.digest:
        raise DigestMismatchError(f"{source}: config blob does not match its digest {cdesc.digest}")
    config = _parse_json(config_bytes, f"{source} config")
    ldescs, diff_ids, ids = image_layers(manifest, config, source, f"{source} manifest",
                                         f"{source}: config {cdesc.digest}")
    image_name = name if name is not None else default_name(transport, rest)
    partial = _Partial(store)

    imported: list[str] = []
    present: list[str] = []
    total_bytes = total_entries = 0
    with ImportBatch(store) as batch:
        todo: list[int] = []
        for i, lid in enumerate(ids):
            if batch.has_layer(lid):
                present.append(lid)
                emit({"event": "layer", "status": "present", "index": i, "layer": lid,
                      "digest": ldescs[i].digest, "size": ldescs[i].size})
                continue
            todo.append(i)
        resumed = {}
        for i in todo:
            tree = partial.load(ids[i], ldescs[i].digest, diff_ids[i], store)
            if tree is not None:
                resumed[i] = tree
        fetch = [i for i in todo if i not in resumed]
        # one proxy per concurrent fetch: the extra ones open the image by its manifest digest
        reopen = f"docker:{_repo_of(rest)}@{mdigest}" if transport == "docker" else source
        want = max(1, min(len(proxies), len(fetch)))
        for p in proxies[1:want]:
            p.initialize()
        fetcher = _Fetcher(source, reopen, proxies[:want], image, emit, batch.objects,
                           kill_on_error=transport == "docker")
        done_layers: dict[int, Any] = {}
        kept: list[str] = []
        try:
            for i, tree in resumed.items():
                meta = partial.meta(ids[i])
                batch.add_layer(tree, parent=ids[i - 1] if i else None, diff_id=diff_ids[i],
                                compressed_digest=ldescs[i].digest, compressed_size=ldescs[i].size,
                                diff_size=meta.get("diff_size"))
                emit({"event": "layer", "status": "resumed", "index": i, "layer": ids[i],
                      "digest": ldescs[i].digest, "size": ldescs[i].size})
                imported.append(ids[i])
            with contextlib.closing(fetcher.run([(i, ldescs[i], diff_ids[i]) for i in fetch])) as results:
                for i, layer in results:
                    done_layers[i] = layer
                    batch.add_layer(layer.tree, parent=ids[i - 1] if i else None, diff_id=diff_ids[i],
                                    compressed_digest=ldescs[i].digest, compressed_size=ldescs[i].size,
                                    diff_size=layer.diff_size)
                    total_bytes += layer.diff_size
                    total_entries += layer.entries
                    imported.append(ids[i])
                    if partial.save(batch, ids[i], ldescs[i].digest, diff_ids[i], layer.diff_size):
                        kept.append(ids[i])
            batch.set_image(cdesc.digest, ids[-1] if ids else None, config=config_bytes, manifest=mbytes,
                            names=[image_name] if image_name else [])
            record = batch.commit()
        except BaseException:
            _keep_objects(batch, [done_layers[i].tree for i in done_layers]
                          + [resumed[i] for i in resumed])
            raise
    for lid in kept + [ids[i] for i in resumed]:
        partial.drop(lid)
    partial.prune()
    if options.digestfile:
        from flatmount.atomic import AtomicFile
        from flatmount.safepath import check_output

        check_output(options.digestfile)   # only a new or regular file: never a device or a symlink
        try:
            with AtomicFile(os.path.dirname(os.path.abspath(options.digestfile))) as af:
                af.file.write(mdigest.encode())
                af.commit(options.digestfile)
        except OSError as e:
            raise RegistryError(f"cannot write --digestfile {options.digestfile}: {e.strerror}") from None
    assert record is not None
    order = {lid: k for k, lid in enumerate(ids)}
    return PullResult(record, tuple(sorted(imported, key=order.__getitem__)), tuple(present),
                      total_bytes, total_entries)


def _keep_objects(batch: ImportBatch, trees: list) -> None:
    """Completed layers' objects survive the failed batch's rollback (a re-pull resumes with them)."""
    from flatmount.store.batch import tree_objects

    keep: set[str] = set()
    for t in trees:
        keep |= tree_objects(t)
    batch.keep_objects(keep)


class _Fetcher:
    """Fetch layer blobs with a pool of proxies; yields (index, TarLayer) as each completes."""

    def __init__(self, source: str, reopen: str, proxies: list[Proxy], image: int, emit: Events, objects: Any,
                 kill_on_error: bool = True):
        self.source = source
        self.reopen = reopen
        self.proxies = proxies
        self.images: dict[int, int] = {id(proxies[0]): image}
        self.emit = emit
        self.objects = objects
        self.cancelled = threading.Event()
        self.kill_on_error = kill_on_error  # else (local archives) the streams run out by themselves

    def run(self, work: list[tuple[int, Descriptor, str]]):
        import queue
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        if not work:
            return
        free: queue.SimpleQueue = queue.SimpleQueue()
        for p in self.proxies:
            free.put(p)
        def one(item: tuple[int, Descriptor, str]):
            proxy = free.get()
            try:
                if self.cancelled.is_set():
                    raise _Cancelled()
                return item[0], self._fetch(proxy, item)
            finally:
                free.put(proxy)

        pool = ThreadPoolExecutor(max_workers=len(self.proxies), thread_name_prefix="flatmount-fetch")
        futures = {pool.submit(one, item) for item in work}
        try:
            pending = futures
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    yield f.result()
        except BaseException:
            self.cancelled.set()
            for f in futures:
                f.cancel()
            if self.kill_on_error:
                for p in self.proxies:
                    p.kill()  # every stream ends now, so every worker returns soon
            raise
        finally:
            pool.shutdown(wait=True)

    def _fetch(self, proxy: Proxy, item: tuple[int, Descriptor, str]) -> Any:
        from flatmount.sources.layers import HashingReader, read_tar, verify

        i, desc, diff_id = item
        key = id(proxy)
        if key not in self.images:
            try:
                self.images[key] = proxy.open_image(self.reopen)
            except RegistryError as e:
                raise RegistryError(_clean_error(str(e), self.source)) from None
        label = f"{self.source} layer {i} ({desc.digest[:19]})"
        alg = desc.digest.partition(":")[0]
        emit = self.emit
        emit({"event": "layer", "status": "fetching", "index": i, "digest": desc.digest, "size": desc.size})
        start = time.monotonic()
        try:
            with proxy.get_blob(self.images[key], desc.digest, desc.size) as stream:
                def report(_n: int, _e: int, _s=stream) -> None:
                    emit({"event": "progress", "index": i, "digest": desc.digest, "bytes": _s.nread,
                          "size": desc.size})

                layer = read_tar(HashingReader(stream, alg), self.objects, label=label,  # type: ignore[arg-type]
                                 progress=report, size=desc.size)
        except RegistryError as e:
            if self.cancelled.is_set():
                raise _Cancelled() from None
            raise RegistryError(_clean_error(str(e), f"{self.source} layer {i} ({desc.digest})")) from None
        except FlatmountError:
            if self.cancelled.is_set():
                raise _Cancelled() from None
            raise
        verify(layer, blob_digest=desc.digest, blob_size=desc.size, diff_id=diff_id, label=label)
        secs = time.monotonic() - start
        emit({"event": "layer", "status": "done", "index": i, "digest": desc.digest, "size": desc.size,
              "bytes": layer.compressed_size, "seconds": round(secs, 3)})
        return layer


class _Partial:
    """Layer images of a failed pull's completed layers, under `<runroot>/pull-partial/` (see module doc)."""

    def __init__(self, store: Store):
        from flatmount.safepath import check_private_subdir

        self.dir = os.path.join(store.runroot_str, _PARTIAL_DIR)
        check_private_subdir(self.dir, "runroot")   # prune() unlinks in it: never through a symlink

    def _path(self, lid: str, ext: str) -> str:
        return os.path.join(self.dir, f"{lid}.{ext}")

    def meta(self, lid: str) -> dict:
        try:
            fd = os.open(self._path(lid, "json"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                doc = json.loads(f.read(65536))
            return doc if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            return {}

    def load(self, lid: str, blob_digest: str, diff_id: str, store: Store):
        """The kept layer's tree, if it is this layer and every object it names is in the primary."""
        from flatmount.image.reader import Image
        from flatmount.store.batch import tree_objects

        if not is_hex(lid, 64):
            return None
        meta = self.meta(lid)
        if meta.get("digest") != blob_digest or meta.get("diff_id") != diff_id:
            return None
        try:
            fd = os.open(self._path(lid, "erofs"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                data = f.read()
            if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
                return None
            with Image(data) as img:
                tree = img.root()
            objs = tree_objects(tree)
        except (OSError, FlatmountError, ValueError):
            return None
        objdir = store.objects_str
        if not all(os.path.isfile(f"{objdir}/{o}") for o in objs):
            return None
        return tree

    def save(self, batch: ImportBatch, lid: str, blob_digest: str, diff_id: str, diff_size: int) -> bool:
        """Keep a copy of the staged layer image (until the pull commits); best effort."""
        from flatmount.atomic import AtomicFile

        src = os.path.join(batch.staging, f"layer-{lid}.erofs")
        try:
            from flatmount.safepath import make_private_subdir

            make_private_subdir(self.dir, "runroot")
            with open(src, "rb") as f:
                data = f.read()
            meta = json.dumps({"digest": blob_digest, "diff_id": diff_id, "diff_size": diff_size,
                               "sha256": hashlib.sha256(data).hexdigest()}).encode()
            for ext, content in (("erofs", data), ("json", meta)):  # derived, checked at load: no fsync
                with AtomicFile(self.dir, mode=0o600, durable=False) as af:
                    af.file.write(content)
                    af.commit(self._path(lid, ext))
        except (OSError, FlatmountError):
            return False
        return True

    def prune(self, max_age_s: float = 7 * 86400) -> None:
        """Forget what no re-pull came back for within `max_age_s`; the directory goes when empty."""
        cutoff = time.time() - max_age_s
        with contextlib.suppress(OSError):
            for e in os.scandir(self.dir):
                with contextlib.suppress(OSError):
                    if e.is_file(follow_symlinks=False) and e.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(e.path)
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)  # only if empty

    def drop(self, lid: str) -> None:
        for ext in ("erofs", "json"):
            with contextlib.suppress(OSError):
                os.unlink(self._path(lid, ext))
