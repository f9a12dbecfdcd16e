"""Where an object lives below an object directory: `XX/<62 hex>` (composefs layout), the rule and
its patterns defined once for the object store and every reader of object paths (flatmount's store,
gc, pull, usage, image tree and writer)."""

from __future__ import annotations

_PATTERNS = {
    "OBJPATH_RE": r"[0-9a-f]{2}/[0-9a-f]{62}",                        # a whole object path
    "FANOUT_RE": r"[0-9a-f]{2}",                                      # a fan-out directory name
    "REST_RE": r"[0-9a-f]{62}",                       # an object's file name in its fan-out directory
    "OBJPATH_IN_TEXT_RE": r"(?:^|/)([0-9a-f]{2})/([0-9a-f]{62})$",    # a path ending in one
}


def __getattr__(name: str):  # (PEP 562) the patterns, compiled on first use, not by every import
    """Why: compiling them cost each CLI command 0.7 ms of start-up, and most use none of them;
    callers look them up as `paths.OBJPATH_RE` where they use them (an import of the name would
    compile it at once)."""
    try:
        source = _PATTERNS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    import re

    globals()[name] = compiled = re.compile(source)
    return compiled


def is_hex(s: str, shortest: int, longest: int | None = None) -> bool:
    """Whether `s` is `shortest` (to `longest`) lowercase hex digits (without a pattern)."""
    return shortest <= len(s) <= (longest or shortest) and not s.strip("0123456789abcdef")


def is_sha256_digest(s: object) -> bool:
    """Whether `s` is a sha256 digest as OCI and containers/storage write one: `sha256:<64 hex>`."""
    return isinstance(s, str) and s.startswith("sha256:") and is_hex(s[7:], 64)


def object_path(digest: bytes) -> str:
    """`XX/<62 hex>` of a 32-byte digest."""
    h = digest.hex()
    return f"{h[:2]}/{h[2:]}"


def object_path_hex(hexdigest: str) -> str:
    """`XX/<62 hex>` of a 64-hex digest."""
    return f"{hexdigest[:2]}/{hexdigest[2:]}"
