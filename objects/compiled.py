"""The optional compiled modules (C loops built by `pip install -e .` where a C compiler is): the one
place that decides whether flatmount may use them.

Each compiled module covers a hot loop whose pure-Python code stays the specification and the
fallback.  `FLATMOUNT_PURE=1` in the environment (read once, here) turns every one of them off, to
compare the two paths or to rule a compiled one out.
"""

from __future__ import annotations

import os
from importlib import import_module
from types import ModuleType

PURE = os.environ.get("FLATMOUNT_PURE", "") not in ("", "0")


def load(name: str) -> ModuleType | None:
    """The compiled module `name`, or None when it was not built or FLATMOUNT_PURE is set."""
    if PURE:
        return None
    try:
        return import_module(name)
    except ImportError:
        return None
