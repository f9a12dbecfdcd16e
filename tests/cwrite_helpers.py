"""Both implementations of the image fast paths (flatmount/image/_cwrite.c and the pure Python it
falls back to) for tests that run the same inputs through each."""

from __future__ import annotations

import pytest

from flatmount.image import accel
from tests.conftest import IN_CI, require_compiled


def require_cwrite():
    """The compiled module (built by `pip install -e .` where a C compiler is); under CI its absence
    is a failure, not a skip (the fallback would hide a broken build)."""
    _cwrite = require_compiled("flatmount.image._cwrite")
    if accel.PURE:
        msg = "FLATMOUNT_PURE is set: the compiled fast paths are off"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return _cwrite


def use(impl: str):
    """Switch the image code to `impl` ("native" or "python"); returns the previous setting."""
    saved = accel.CWRITE
    accel.CWRITE = require_cwrite() if impl == "native" else None
    return saved
