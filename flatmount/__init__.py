"""flatmount: flatten container layer chains across stores into one EROFS metadata image and mount it
read-only at a merged dir private to that mount.

The public API is loaded lazily so that `import flatmount` (and so CLI start-up) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flatmount.errors import FlatmountError

__all__ = ["FlatmountError", "Inode", "open_store"]
__version__ = "0.1.0"

_LAZY = {
    "Inode": ("flatmount.image.tree", "Inode"),
    "open_store": ("flatmount.api", "open_store"),
}

if TYPE_CHECKING:  # pragma: no cover
    from flatmount.api import open_store
    from flatmount.image.tree import Inode


def __getattr__(name: str):
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'flatmount' has no attribute {name!r}") from None
    import importlib

    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
