"""Where a store keeps what: objects (`objects/XX/<62 hex>`, objects.paths), layer images and their
tree caches (`layers/<id>.erofs`, `.tree`), flattened images and their derived files
(`images/<digest>.erofs`, `.tree`, `.index`), temp files (`tmp/`).  Whoever writes or removes one
of these asks here, so the layout is written down once.
"""

from __future__ import annotations

import _thread
import contextlib
import os

from objects import paths as objpaths

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: CLI start-up, see objects/lazy.py)
if TYPE_CHECKING:  # pragma: no cover
    import threading
    from collections.abc import Callable, Iterator

DB_NAME = "flatmount.db"
TREE_SUFFIX = ".tree"     # images/<digest>.tree: the tree cache (flatmount.image.treecache)
INDEX_SUFFIX = ".index"   # images/<digest>.index: the diff index (flatmount.diff.ImageIndex)


def flat_image_path(store_root: str | os.PathLike, digest: str) -> str:
    return os.path.join(os.fspath(store_root), "images", digest + ".erofs")


def layer_cache_path(layer_image: str | os.PathLike) -> str:
    """`layers/<id>.tree` beside `layers/<id>.erofs`: the layer's tree cache (same format as a flat
    image's, keyed by the sha256 of the layer image, which a layer's name is not)."""
    path = os.fspath(layer_image)
    return path[: -len(".erofs")] + TREE_SUFFIX if path.endswith(".erofs") else path + TREE_SUFFIX


def derived_paths(image_path: str | os.PathLike) -> tuple[str, str]:
    """The derived files of a flattened image `<root>/images/<digest>.erofs` (tree cache, diff index):
    remove them with the image.  They may be absent."""
    base = os.fspath(image_path)[: -len(".erofs")]
    return base + TREE_SUFFIX, base + INDEX_SUFFIX


def reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def scan_objects(objects_dir: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """(object path `XX/<62 hex>`, absolute path) of every object file, unsorted, no stat calls."""
    root = os.fspath(objects_dir)
    try:
        with os.scandir(root) as it:
            fanout = [e.name for e in it if objpaths.FANOUT_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return
    for xx in fanout:
        d = os.path.join(root, xx)
        try:
            with os.scandir(d) as it:
                for e in it:
                    if objpaths.REST_RE.fullmatch(e.name) and e.is_file(follow_symlinks=False):
                        yield f"{xx}/{e.name}", e.path
        except FileNotFoundError:
            continue


class DerivedWriters:
    """Background writers of flattened images' derived files (tree cache, diff index).

    They are caches: nothing needs them to be there, so flatten returns (and the image can be
    recorded and mounted) while they are built, about as long again as writing the image takes.
    Each writer holds the store's GC lock shared while it writes (like any writer of the store), and
    writes nothing if the image is gone by then.  A writer is a thread of this process, or the helper
    process that wrote half of a big image (flatmount.flatten, adopted here).  The threads are not
    daemons (the interpreter waits for them at exit; a helper finishes on its own); `wait()` waits for
    both, which whatever reads derived files in this process (flatten's tree cache, flatmount.diff)
    and whatever may remove them (`Store.close`, gc, fsck) does first, never while holding the GC
    lock exclusively.  What they write is flatmount.flatten's business; when they are done is the
    store's (`wait_derived`)."""

    MAX_PENDING = 2  # a process flattening image after image waits for older writers beyond this

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []
        self._helpers: list[int] = []   # pids
        self._lock = _thread.allocate_lock()  # (threading itself is imported by the first writer:
        # a millisecond of start-up for the commands that start none, mount and umount)

    def start(self, target: Callable[..., None], *args: object) -> None:
        """Run `target(*args)` in a writer thread (after the oldest ones beyond MAX_PENDING finish).

        The caller keeps the GIL when this returns: `Thread.start` waits until the new thread runs,
        and a new thread that went straight on to its work would keep the GIL for a switch interval
        or for a whole C call (a tree cache encode: 10 ms and more) before the caller, whose result
        is ready, could return it (measured: 0.5-17 ms, typically 7-11 ms, of every flatten of a
        64k-inode chain).  So the thread first waits for `go`, which is set once `start` returned
        from the thread's start-up: it then asks for the GIL as any other thread does."""
        import threading

        go = threading.Event()
        t = threading.Thread(target=_after, args=(go, target, args), name="flatmount-derived", daemon=False)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            backlog = self._threads[: max(0, len(self._threads) - self.MAX_PENDING + 1)]
        for old in backlog:  # bounded: each holds its tree in memory until it is done
            old.join()
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        try:
            t.start()
        finally:
            go.set()

    def adopt(self, pid: int) -> None:
        """A helper process (our child) now writing derived files: waited for like the threads."""
        with self._lock:
            self._helpers.append(pid)
            backlog = self._helpers[: max(0, len(self._helpers) - self.MAX_PENDING)]
            del self._helpers[: len(backlog)]
        for old in backlog:  # bounded: each holds a tree in memory until it is done
            reap(old)

    def wait(self) -> None:
        """Wait for every pending derived-file writer of this process."""
        with self._lock:
            threads, self._threads = self._threads, []
            helpers, self._helpers = self._helpers, []
        if threads:
            import threading

            me = threading.current_thread()
            for t in threads:
                if t is not me:
                    t.join()
        for pid in helpers:
            reap(pid)


def _after(go: threading.Event, target: Callable[..., None], args: tuple) -> None:
    """A derived-file writer thread's body: `target(*args)` once `go` is set (DerivedWriters.start)."""
    go.wait()
    target(*args)


DERIVED = DerivedWriters()
wait_derived = DERIVED.wait
