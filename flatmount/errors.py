"""The one exception hierarchy of flatmount.

Every failure a user can act on is a `FlatmountError`; the CLI prints its message (no traceback) and
exits 3.  Subclasses also derive from the matching builtin so callers can catch either.
"""

from __future__ import annotations


class FlatmountError(Exception):
    """Root of every error flatmount reports to a person."""


class FormatError(FlatmountError, ValueError):
    """Bytes that do not follow a format (EROFS image, dump file, tar, JSON manifest)."""

    def __init__(self, message: str, offset: int | None = None):
        super().__init__(message)
        self.offset = offset


class CorruptImageError(FormatError):
    """An EROFS image that is truncated, inconsistent or hostile."""


class DumpSyntaxError(FormatError):
    """A composefs dump line that cannot be parsed; `offset` is the 1-based line number."""


class LayerError(FlatmountError):
    """A layer source that cannot be imported (bad tar entry, path traversal, unknown media type)."""


class DigestMismatchError(LayerError):
    """Content whose digest is not the one it was promised to have."""


class OutputError(FlatmountError):
    """An output path flatmount will not write: a symlink, device, FIFO or directory (only new or
    regular files are replaced)."""


class ObjectNotFoundError(FlatmountError, FileNotFoundError):
    """An object an image or layer needs is in none of the object stores."""


class VerityError(FlatmountError):
    """An object's fs-verity digest does not match its name."""


class StoreError(FlatmountError):
    """A store that cannot be opened or used (bad config, read-only store written to, locked)."""


class ReadOnlyStoreError(StoreError, PermissionError):
    """A write to an additional (read-only) store."""


class NotFoundError(StoreError, LookupError):
    """An image, layer or mount name/id that the stores do not know."""


class MountError(FlatmountError, OSError):
    """The kernel refused a mount or unmount; carries errno and what to check."""

    def __init__(self, message: str, errno: int | None = None):
        FlatmountError.__init__(self, message)
        self.errno = errno

    def __str__(self) -> str:  # OSError's __str__ would hide our message behind errno formatting
        return self.args[0] if self.args else ""


class PermissionRequiredError(MountError, PermissionError):
    """An operation that needs root (CAP_SYS_ADMIN) was attempted without it."""


class RegistryError(FlatmountError):
    """A registry, archive or image transport that fails (down, refused credentials, bad TLS, cut off)."""
