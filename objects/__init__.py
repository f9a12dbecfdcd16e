"""Content-addressed object store named by fs-verity digests (composefs layout); no flatmount import.

    from objects import ObjectStore
    store = ObjectStore("/var/lib/x/objects")
    digest = store.put_file("/etc/os-release")   # 32 raw bytes
    store.sync()                                 # durable from here on
"""

from .digest import FsVerityHasher, digest_file, digest_stream, fsverity_digest, parse_digest
from .errors import (
    InvalidDigestError,
    ObjectDigestMismatchError,
    ObjectNotFoundError,
    ObjectStoreError,
    ReadOnlyObjectStoreError,
)
from .store import ObjectStore

__all__ = [
    "FsVerityHasher",
    "InvalidDigestError",
    "ObjectDigestMismatchError",
    "ObjectNotFoundError",
    "ObjectStore",
    "ObjectStoreError",
    "ReadOnlyObjectStoreError",
    "digest_file",
    "digest_stream",
    "fsverity_digest",
    "parse_digest",
]
