"""The pipe between a bulk writer (objects.bulk) and its helper processes (objects.bulkhelper): the
record and report formats and the sizes both sides agree on, in a module that imports nothing else,
so that a helper starts without loading the object store."""

from __future__ import annotations

import struct

FLUSH_EVERY = 16 << 20  # the first helper starts writeback of the file system after this many bytes
PIPE_BUFFER = 1 << 20  # bytes buffered before a write to the helper (and the pipe size asked for)
RECORD = struct.Struct("<32sI")  # digest, data size; the data follows
COUNT = struct.Struct("<I")  # a helper's output: count, the digests it created, then `ok` or an error
OK = b"ok\n"
