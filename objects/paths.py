"""Where an object lives below an object directory: `XX/<62 hex>` (composefs layout), the rule and
its patterns defined once for the object store and every reader of object paths (flatmount's store,
gc, pull, usage, image tree and writer)."""

from __future__ import annotations

import re

OBJPATH_RE = re.compile(r"[0-9a-f]{2}/[0-9a-f]{62}")   # a whole object path
FANOUT_RE = re.compile(r"[0-9a-f]{2}")                 # a fan-out directory name
REST_RE = re.compile(r"[0-9a-f]{62}")                  # an object's file name in its fan-out directory
OBJPATH_IN_TEXT_RE = re.compile(r"(?:^|/)([0-9a-f]{2})/([0-9a-f]{62})$")   # a path ending in one


def object_path(digest: bytes) -> str:
    """`XX/<62 hex>` of a 32-byte digest."""
    h = digest.hex()
    return f"{h[:2]}/{h[2:]}"


def object_path_hex(hexdigest: str) -> str:
    """`XX/<62 hex>` of a 64-hex digest."""
    return f"{hexdigest[:2]}/{hexdigest[2:]}"
