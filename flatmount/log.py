"""Debug notes through `logging`, without importing it.

`import logging` costs milliseconds that every CLI start would pay; so this module only looks the
module up.  If nobody imported it, nobody configured a handler and there is nobody to tell: the
note is dropped.  `flatmount -v` (and any program using the library that configures logging) gets
every choice a silent fallback makes: the mount API path, a loop device, the flatten helper.
"""

from __future__ import annotations

import sys

LOGGER = "flatmount"


def debug(fmt: str, *args: object) -> None:
    """`logging.getLogger("flatmount").debug(fmt, *args)` when logging is in use; else nothing."""
    logging = sys.modules.get("logging")
    if logging is not None:
        logging.getLogger(LOGGER).debug(fmt, *args)
