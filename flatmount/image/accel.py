"""Which implementation the image code runs: the compiled fast paths (flatmount/image/_cwrite.c) or
pure Python only.

The compiled module is optional (built by `pip install -e .` where a C compiler is) and covers only the
valid, common case: on anything else its functions return None and the Python code, which is the
specification and words every error, runs on the same input.  `FLATMOUNT_PURE=1` in the environment
(read once, here) turns every compiled accelerator off, to compare the two or to rule one out.
Callers read `accel.CWRITE` at call time, so tests can swap it for None.
"""

from __future__ import annotations

import os
from types import ModuleType

PURE = os.environ.get("FLATMOUNT_PURE", "") not in ("", "0")


def _load() -> ModuleType | None:
    if PURE:
        return None
    try:
        import flatmount.image._cwrite as _cwrite
    except ImportError:
        return None
    return _cwrite


CWRITE: ModuleType | None = _load()
