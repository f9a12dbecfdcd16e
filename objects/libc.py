"""libc calls the os module lacks (syncfs, sync_file_range, fallocate), loaded on first use: ctypes is slow to
import and `import objects` must stay cheap."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable


class _Libc:
    """syncfs(), sync_file_range() and fallocate(), which the os module lacks (os.posix_fallocate
    writes zeros where the file system cannot allocate); loaded on first use (ctypes is slow to import)."""

    _loaded = False
    syncfs: Callable[[int], int] | None = None
    sync_file_range: Callable[[int, int, int, int], int] | None = None
    fallocate: Callable[[int, int, int, int], int] | None = None

    @classmethod
    def load(cls) -> type[_Libc]:
        if not cls._loaded:
            try:
                import ctypes

                libc = ctypes.CDLL(None, use_errno=True)
                fn = libc.syncfs
                fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
                cls.syncfs = fn
                fn = libc.sync_file_range
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                fn.restype = ctypes.c_int
                cls.sync_file_range = fn
                fn = libc.fallocate64
                fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
                fn.restype = ctypes.c_int
                cls.fallocate = fn
            except (ImportError, OSError, AttributeError):
                pass
            cls._loaded = True
        return cls


def _syncfs(fd: int) -> bool:
    """Flush the whole filesystem holding `fd`; False if syncfs() is unavailable."""
    fn = _Libc.load().syncfs
    if fn is None:
        return False
    if fn(fd) != 0:
        import ctypes

        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            return False
        raise OSError(err, os.strerror(err))
    return True


def _fallocate(fd: int, size: int) -> bool:
    """Allocate the first `size` bytes of a file (its size then at least `size`) without writing
    them; False where the file system or libc cannot (nothing changed then)."""
    fn = _Libc.load().fallocate
    return fn is not None and fn(fd, 0, 0, size) == 0
