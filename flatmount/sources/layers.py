"""Layer tarballs -> layer tree + objects: the import's public names, from the modules that hold them
(the byte pipeline, flatmount.sources.pipeline; the tar reader, flatmount.sources.tarreader).  Recording
a layer or an image in a store: flatmount.store.batch (`record_layer`, `record_image`)."""

from __future__ import annotations

from flatmount.sources.pipeline import (
    CHUNK,
    GZIP_MAGIC,
    ZSTD_MAGIC,
    ForwardReader,
    HashingReader,
    detect_compression,
    verify,
)
from flatmount.sources.tarreader import NAME_MAX, OBJECT_CHUNK, LayerTreeBuilder, Progress, TarLayer, read_tar

__all__ = ["CHUNK", "GZIP_MAGIC", "NAME_MAX", "OBJECT_CHUNK", "ZSTD_MAGIC", "ForwardReader", "HashingReader",
           "LayerTreeBuilder", "Progress", "TarLayer", "detect_compression", "read_tar", "verify"]
