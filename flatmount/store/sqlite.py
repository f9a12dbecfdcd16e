"""The `sqlite3` API the store uses, loaded without the cost of `sqlite3.dbapi2`.

`import sqlite3` costs about 2 ms of every CLI command's start-up, most of it `datetime`, imported
for the default date adapters that no flatmount column uses.  `_sqlite3` is the C module behind it:
the same `connect`, `Connection` and exception classes (`except sqlite3.Error` catches the same
errors either way).  Where a Python lacks it, the package is used.
"""

from __future__ import annotations

try:
    import _sqlite3 as sqlite3

    sqlite3.connect  # noqa: B018 - the C module exports it on the Pythons we know; else use the package
except (ImportError, AttributeError):  # pragma: no cover - depends on the Python build
    import sqlite3  # type: ignore[no-redef]

__all__ = ["sqlite3"]
