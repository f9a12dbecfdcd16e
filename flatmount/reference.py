"""Image names by the reference grammar podman, skopeo and docker use (distribution/reference).

`[HOST[:PORT]/]PATH[/PATH...][:TAG][@ALGO:HEX]`: path components are lowercase letters and digits
joined by `.`, `_`, `__` or dashes; a tag is up to 128 of `[A-Za-z0-9_.-]` not starting with `.` or
`-`; the name before the tag at most 255 characters.  `tag` checks new names with it, so a name
flatmount records is one podman would accept too.
"""

from __future__ import annotations

from flatmount.errors import StoreError

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
REFERENCE = rf"(?P<name>{_NAME})(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?"
NAME_MAX = 255
# One path component with an optional tag (`alpine`, `my-app:1.2`): a subset of the grammar, checked
# without `re` (`is_short`), so most commands never import it nor compile the whole pattern (5 ms of
# CLI start-up).  tests/test_store_names.py checks that it decides as this pattern and as the whole
# grammar do.
SHORT = r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
_COMPONENT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_TAG_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_TAG_CHARS = _TAG_FIRST | {".", "-"}


def is_short(text: str) -> bool:
    """Whether `text` matches SHORT in full: lowercase letters and digits in runs joined by single
    '.', '_' or '-', then optionally ':' and a tag."""
    name, colon, tag = text.partition(":")
    if colon and not (len(tag) <= 128 and tag[:1] in _TAG_FIRST and _TAG_CHARS.issuperset(tag)):
        return False
    after_separator = True   # (a name neither starts nor ends with a separator, nor has two in a row)
    for c in name:
        if c in _COMPONENT_CHARS:
            after_separator = False
        elif c in "._-" and not after_separator:
            after_separator = True
        else:
            return False
    return not after_separator


def check_reference(text: str) -> str:
    """`text` if it is a valid image reference, else StoreError saying what the grammar allows."""
    if is_short(text) and len(text.partition(":")[0]) <= NAME_MAX:
        return text
    import re

    m = re.fullmatch(REFERENCE, text)   # (compiled once: re caches patterns)
    if m is None or not text.isascii():
        raise StoreError(f"invalid image name {text!r}: use [HOST[:PORT]/]PATH[:TAG], PATH of lowercase "
                         "letters and digits joined by '.', '_', '__' or '-', TAG of up to 128 letters, "
                         "digits, '_', '.', '-' (not starting with '.' or '-'), as podman requires")
    if len(m.group("name")) > NAME_MAX:
        raise StoreError(f"invalid image name {text[:40]!r}...: the repository name is longer than "
                         f"{NAME_MAX} characters")
    return text
