"""flatmount: flatten container layer chains across stores into one EROFS metadata image and mount it
read-only at a merged dir private to that mount.

The public API is loaded lazily so that `import flatmount` (and so CLI start-up) stays cheap.
"""

from __future__ import annotations

from flatmount.errors import FlatmountError
from objects.lazy import lazy_names

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: CLI start-up, see objects/lazy.py)

__all__ = ["FlatmountError", "Inode", "open_store"]
__version__ = "0.1.0"

__getattr__ = lazy_names(__name__, globals(), {"Inode": "flatmount.image.tree", "open_store": "flatmount.api"})

if TYPE_CHECKING:  # pragma: no cover
    from flatmount.api import open_store
    from flatmount.image.tree import Inode

