"""Every file lock of flatmount, in one place, so the rules about them are read once.

- `<root>/gc.lock` (flock): writers of a store hold it shared from their first object put to their
  commit, gc holds it exclusive (`gc_lock`, `try_exclusive`, `store_lock`).
- a mount dir `<runroot>/mounts/<id>` (flock, exclusive): held by a mount or unmount in progress
  (`lock_dir`); a lease whose dir is locked is live.
- a staging dir or temp file in `<root>/tmp` (flock, exclusive): held by its writer while alive
  (`hold`); a cleaner removes only entries nobody holds (`held_by_other`).
- containers-storage's `layers.lock` / `images.lock` (POSIX `lockf`, shared): taken as c/storage's
  readers do (`posix_read_lock`); such locks belong to the process (see flatmount.sources.cstorage).

Lock files are opened without following symlinks: one swapped for a symlink would make us create or
open a file elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from flatmount.errors import ReadOnlyStoreError, StoreError

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: CLI start-up, see objects/lazy.py)
if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Iterator
    from typing import Protocol

    class Store(Protocol):
        """What the GC lock needs of a store (flatmount.store.core.Store, which calls this module)."""

        root_str: str
        readonly: bool

        def ensure_writable(self, clean: bool = True) -> None: ...

        def gc_lock(self, shared: bool, clean: bool = True) -> contextlib.AbstractContextManager[None]: ...

GC_LOCK = "gc.lock"


def open_lock_file(path: str | os.PathLike, create: bool) -> int:
    """An fd of lock file `path` (created 0600 if `create`), never through a symlink: a lock file
    swapped for a symlink would let another user make us create or open files elsewhere."""
    flags = (os.O_RDWR | os.O_CREAT if create else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY
    try:
        fd = os.open(path, flags | os.O_NONBLOCK, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StoreError(f"lock file {path} is a symbolic link; remove it (store tampered with?)") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StoreError(f"lock file {path} is not a regular file; remove it (store tampered with?)")
    return fd


def flock(fd: int, *, shared: bool = False, wait: bool = True) -> bool:
    """flock `fd` (shared or exclusive); False when `wait` is off and another open file holds it."""
    import fcntl

    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def hold(fd: int) -> None:
    """Mark a writer's own staging dir or temp file as alive (exclusive flock, waiting: a cleaner may
    be probing it this very moment, and holds the lock only for that probe)."""
    flock(fd)


def held_by_other(fd: int) -> bool:
    """Whether some live open file holds an flock on the file of `fd` (a writer marking it alive).
    Takes the lock when it is free: the caller closes `fd` when it is done with the entry."""
    return not flock(fd, wait=False)


def entry_held(path: str) -> bool:
    """Whether a live process holds an flock on `path` (opened without following a symlink); an
    entry that cannot be opened counts as held unless it is gone or a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        return e.errno not in (errno.ENOENT, errno.ELOOP)
    try:
        return held_by_other(fd)
    finally:
        os.close(fd)


def lock_dir(path: str, wait: bool = True) -> int | None:
    """An fd of directory `path` holding its exclusive flock; None if busy (wait=False) or gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not flock(fd, wait=wait):
        os.close(fd)
        return None
    if os.fstat(fd).st_nlink == 0:  # removed by someone who held the lock before us
        os.close(fd)
        return None
    return fd


def dir_busy(path: str) -> bool:
    """Whether some process holds the flock of a mount dir (a mount or unmount in progress)."""
    fd = lock_dir(path, wait=False)
    if fd is None:
        return os.path.isdir(path)
    os.close(fd)
    return False


def posix_read_lock(fd: int) -> None:
    """A shared POSIX record lock (`lockf`) on the whole file, as containers-storage's readers take;
    waits for a writer.  Dropped when ANY fd of the file is closed by this process."""
    import fcntl

    fcntl.lockf(fd, fcntl.LOCK_SH)


@contextlib.contextmanager
def _holding(fd: int, shared: bool) -> Iterator[None]:
    """The flock of `fd` (shared or exclusive, waiting) for the block; the fd is closed after it."""
    try:
        flock(fd, shared=shared)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def gc_lock(store: Store, shared: bool, clean: bool = True) -> Iterator[None]:
    """flock on <root>/gc.lock: writers hold it shared from first object put to commit, gc exclusive.

    On a read-only store a shared lock is taken only if the lock file exists (never created);
    an exclusive one is refused.  Locks on separate opens conflict even within one process.
    `clean`: see `Store.ensure_writable`.
    """
    path = os.path.join(store.root_str, GC_LOCK)
    if store.readonly:
        if not shared:
            raise ReadOnlyStoreError(f"store {store.root_str} is read-only: no exclusive GC lock")
        try:
            fd = open_lock_file(path, create=False)
        except (OSError, StoreError):
            yield
            return
    else:
        store.ensure_writable(clean=clean)
        fd = open_lock_file(path, create=True)
    with _holding(fd, shared):
        yield


@contextlib.contextmanager
def try_exclusive(store: Store) -> Iterator[bool]:
    """The exclusive GC lock if free right now (True), without waiting; else False."""
    try:
        fd = open_lock_file(os.path.join(store.root_str, GC_LOCK), create=True)
    except OSError:
        yield False
        return
    try:
        yield flock(fd, wait=False)
    finally:
        os.close(fd)


@contextlib.contextmanager
def store_lock(store: Store, shared: bool) -> Iterator[None]:
    """The store's GC lock without side effects on the store.

    Exclusive on a writable store: `gc_lock`.  Shared, or on a read-only store: flock through a
    read-only fd of the existing lock file (a shared lock never creates the store, never cleans its
    tmp/), created only if the store directory exists and is writable to us.
    """
    if not store.readonly and not shared:
        with store.gc_lock(shared=False):
            yield
        return
    path = os.path.join(store.root_str, GC_LOCK)
    try:
        fd = open_lock_file(path, create=False)
    except FileNotFoundError:
        fd = -1
        if not store.readonly and os.path.isdir(store.root_str):
            with contextlib.suppress(OSError):
                fd = open_lock_file(path, create=True)
    except OSError:
        fd = -1
    if fd < 0:  # no writer ever ran here (or we may not open the file): nothing to exclude
        yield
        return
    with _holding(fd, shared):
        yield


@contextlib.contextmanager
def gc_lock_if_idle(store: Store) -> Iterator[bool | None]:
    """Probe the GC lock without creating it: True if it was free (held exclusive meanwhile), False
    if a writer holds it, None if there is no lock file to probe (no writer ever ran)."""
    try:
        fd = open_lock_file(os.path.join(store.root_str, GC_LOCK), create=False)
    except OSError:
        yield None
        return
    try:
        yield flock(fd, wait=False)
    finally:
        os.close(fd)
