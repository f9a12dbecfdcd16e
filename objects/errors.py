"""Errors of the object store library (stand-alone: no flatmount import).

Each class also derives from the matching builtin, so callers can catch either the library's root
`ObjectStoreError` or e.g. `FileNotFoundError`/`PermissionError`.
"""

from __future__ import annotations


class ObjectStoreError(Exception):
    """Root of every failure the object store reports (bad digest, I/O failure, read-only store)."""


class ObjectNotFoundError(ObjectStoreError, FileNotFoundError):
    """The object with this digest is not in the store."""


class ReadOnlyObjectStoreError(ObjectStoreError, PermissionError):
    """A write (put, remove, clean_temp) on a store opened read-only."""


class ObjectDigestMismatchError(ObjectStoreError):
    """Content whose fs-verity digest is not the one the caller expected."""


class InvalidDigestError(ObjectStoreError, ValueError):
    """A digest that is neither 32 raw bytes, 64 hex digits nor an `XX/<62 hex>` object path."""
