"""Which implementation reads whole images and writes dumps: the compiled fast path or Python.

`CREAD` is the compiled module `flatmount.image._cread` (image/_cread.c, built by `pip install -e .`
where a C compiler is; optional) or None.  The Python code in reader.py and dump.py is the reference:
the compiled path takes only valid, common input and returns None on anything else, and the caller
then runs the Python path on the same input, so every error keeps its one wording.

`FLATMOUNT_PURE=1` in the environment turns every compiled accelerator of flatmount off (for
comparison and tests); it is read once, here, at import.
"""

from __future__ import annotations

import os
from types import ModuleType

from flatmount.image.tree import Inode

__all__ = ["CREAD", "PURE"]

PURE = os.environ.get("FLATMOUNT_PURE", "") not in ("", "0")


def _load() -> ModuleType | None:
    if PURE:
        return None
    try:
        import flatmount.image._cread as _cread
    except ImportError:
        return None
    try:
        _cread.setup(Inode)
    except TypeError:   # the tree model changed and the C code did not (tests/test_cread.py fails)
        return None
    return _cread


CREAD: ModuleType | None = _load()
