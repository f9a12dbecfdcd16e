"""composefs-layout EROFS metadata images: `format` (on-disk records), `writer`, `reader`."""

from __future__ import annotations

__all__ = ["Image", "collect_objects", "dir_size", "image_bytes", "read_tree", "write_image"]


def __getattr__(name: str):
    if name in ("write_image", "image_bytes", "dir_size"):
        from flatmount.image import writer

        return getattr(writer, name)
    if name in ("Image", "read_tree", "collect_objects"):
        from flatmount.image import reader

        return getattr(reader, name)
    raise AttributeError(f"module 'flatmount.image' has no attribute {name!r}")
