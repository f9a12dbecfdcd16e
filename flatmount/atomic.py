"""Nothing half-written is ever visible: write a temp file, fsync it, rename it into place, fsync the
directory.  One implementation for every file flatmount publishes (images, layer tars, derived
caches); `objects/` has its own, being a stand-alone library.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: CLI start-up, see objects/lazy.py)

if TYPE_CHECKING:  # pragma: no cover
    from typing import BinaryIO


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or unlink in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unique(tmp_dir: str | os.PathLike, prefix: str, make):
    """`make(path)` for a new `<tmp_dir>/<prefix><12 hex>` (another name if it exists): (what `make`
    returned, path)."""
    tmp_dir = os.fspath(tmp_dir)
    for _ in range(100):
        path = os.path.join(tmp_dir, prefix + os.urandom(6).hex())
        try:
            return make(path), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {tmp_dir}")


def create_temp(tmp_dir: str | os.PathLike, prefix: str) -> tuple[int, str]:
    """A new file `<tmp_dir>/<prefix><12 hex>` opened for writing, mode 0600, never through a symlink:
    (fd, path).  What `tempfile.mkstemp` does, without its import (with `random` and `shutil` behind
    it, ~4 ms of a process that flattens the image it is about to mount)."""
    return _unique(tmp_dir, prefix, lambda path: os.open(
        path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))


def make_temp_dir(tmp_dir: str | os.PathLike, prefix: str) -> str:
    """A new directory `<tmp_dir>/<prefix><12 hex>`, mode 0700: `tempfile.mkdtemp` without its import."""
    return _unique(tmp_dir, prefix, lambda path: os.mkdir(path, 0o700))[1]


class AtomicFile:
    """`with AtomicFile(tmp_dir) as af: af.file.write(...); af.commit(final_path)`.

    The temp file lives in `tmp_dir` (same filesystem as the final path); leaving the block without
    `commit` removes it.  `durable=False` skips both fsyncs (for derived caches a reader validates).
    The final name may be chosen after writing (content-addressed files)."""

    def __init__(self, tmp_dir: str | os.PathLike, *, mode: int = 0o644, durable: bool = True,
                 prefix: str = ".tmp-"):
        self.mode, self.durable = mode, durable
        fd, self.tmp = create_temp(tmp_dir, prefix)
        self.file: BinaryIO = os.fdopen(fd, "wb")
        self.committed: str | None = None
        self._synced = False  # the content is fsynced already (sync_while)

    def __enter__(self) -> AtomicFile:
        return self

    def sync_while(self, work):
        """Flush the content and fsync it in a helper thread while this one runs `work()` (e.g. hashing
        the content for the final name: both release the GIL); returns what `work` returns."""
        import threading

        self.file.flush()
        failed: list[BaseException] = []

        def sync() -> None:
            try:
                os.fsync(self.file.fileno())
            except BaseException as e:  # noqa: BLE001 - raised by the caller's thread below
                failed.append(e)

        t = threading.Thread(target=sync, name="flatmount-fsync")
        t.start()
        try:
            return work()
        finally:
            t.join()
            if failed:
                raise failed[0]
            self._synced = True

    def commit(self, path: str | os.PathLike) -> str:
        """Flush, fsync, chmod and rename the temp file to `path` (replacing it); returns `path`."""
        path = os.fspath(path)
        self.file.flush()
        if self.durable and not self._synced:
            os.fsync(self.file.fileno())
        self.file.close()
        os.chmod(self.tmp, self.mode)
        os.rename(self.tmp, path)
        self.committed = path
        if self.durable:
            fsync_dir(os.path.dirname(os.path.abspath(path)))
        return path

    def __exit__(self, *exc: object) -> None:
        if self.committed is None:
            self.file.close()
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
