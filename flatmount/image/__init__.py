"""composefs-layout EROFS metadata images: `format` (on-disk records), `writer`, `reader`."""

from __future__ import annotations

from objects.lazy import lazy_names

__all__ = ["Image", "collect_objects", "dir_size", "image_bytes", "read_tree", "write_image"]


__getattr__ = lazy_names(__name__, globals(), {
    "write_image": ".writer", "image_bytes": ".writer", "dir_size": ".writer",
    "Image": ".reader", "read_tree": ".reader", "collect_objects": ".reader",
})
