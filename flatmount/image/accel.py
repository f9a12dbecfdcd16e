"""Which implementation the image code runs: its compiled fast paths or pure Python only.

- `CWRITE`: flatmount/image/_cwrite.c, the dump parser and the writer's per-inode passes;
- `CREAD`: flatmount/image/_cread.c, whole-image reads and dump text.

Each is optional (built by `pip install -e .` where a C compiler is; None otherwise, or with
FLATMOUNT_PURE=1: objects/compiled.py) and covers only the valid, common case: on anything else its
functions return None having changed nothing, and the Python code, which is the specification and
words every error, runs on the same input.  Callers read `accel.CWRITE` / `accel.CREAD` at call time,
so tests can swap either for None.  (The tree cache decoder and layer merge, `_ctree`, is picked in treecache.py.)
"""

from __future__ import annotations

from types import ModuleType

from flatmount.image.tree import Inode
from objects.compiled import PURE, load

__all__ = ["CREAD", "CWRITE", "PURE"]

CWRITE: ModuleType | None = load("flatmount.image._cwrite")


def _load_cread() -> ModuleType | None:
    cread = load("flatmount.image._cread")
    if cread is None:
        return None
    try:
        cread.setup(Inode)
    except TypeError:   # the tree model changed and the C code did not (tests/test_cread.py fails)
        return None
    return cread


CREAD: ModuleType | None = _load_cread()
