"""Content-addressed object store named by fs-verity digests (composefs layout); no flatmount import.

    from objects import ObjectStore
    store = ObjectStore("/var/lib/x/objects")
    digest = store.put_file("/etc/os-release")   # 32 raw bytes
    store.sync()                                 # durable from here on

Names are loaded on first use so that `import objects.errors` (done by every CLI start) stays cheap.
"""

from __future__ import annotations

from .lazy import lazy_names

TYPE_CHECKING = False  # (not typing's: a bulk helper process imports this package, and starts fast)

_LAZY = {
    "FsVerityHasher": "digest", "digest_file": "digest", "digest_stream": "digest",
    "fsverity_digest": "digest", "parse_digest": "digest",
    "InvalidDigestError": "errors", "ObjectDigestMismatchError": "errors", "ObjectNotFoundError": "errors",
    "ObjectStoreError": "errors", "ReadOnlyObjectStoreError": "errors",
    "ObjectStore": "store", "PendingPut": "store", "BulkWriter": "bulk", "usable_cpus": "cpus",
}
__all__ = [
    "BulkWriter",
    "FsVerityHasher", "InvalidDigestError", "ObjectDigestMismatchError", "ObjectNotFoundError", "ObjectStore",
    "ObjectStoreError", "PendingPut", "ReadOnlyObjectStoreError", "digest_file", "digest_stream",
    "fsverity_digest", "parse_digest", "usable_cpus",
]

if TYPE_CHECKING:  # pragma: no cover
    from .bulk import BulkWriter
    from .cpus import usable_cpus
    from .digest import FsVerityHasher, digest_file, digest_stream, fsverity_digest, parse_digest
    from .errors import (
        InvalidDigestError,
        ObjectDigestMismatchError,
        ObjectNotFoundError,
        ObjectStoreError,
        ReadOnlyObjectStoreError,
    )
    from .store import ObjectStore, PendingPut


__getattr__ = lazy_names(__name__, globals(), {name: "." + module for name, module in _LAZY.items()})
