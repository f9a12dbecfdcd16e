"""Where stores are: the storage.conf file (TOML, like containers/storage's) and the default roots.

From `config=`, else $FLATMOUNT_CONFIG, else /etc/flatmount/storage.conf if it exists:
    [storage]
    root = "/var/lib/flatmount"          # `graphroot` is accepted as an alias
    runroot = "/run/flatmount"
    [storage.options]
    additionalimagestores = ["/mnt/ro-store"]
Explicit arguments override the file; `additional` replaces the configured list.  Defaults: root
/var/lib/flatmount and runroot /run/flatmount for root, else $XDG_DATA_HOME/flatmount
(~/.local/share/flatmount) and $XDG_RUNTIME_DIR/flatmount (/tmp/flatmount-<uid> without it).
"""

from __future__ import annotations

import os

from flatmount.errors import StoreError
from flatmount.record import record

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: CLI start-up, see objects/lazy.py)
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any

DEFAULT_CONFIG = "/etc/flatmount/storage.conf"


@record
class StoreConfig:
    root: str | None = None
    runroot: str | None = None
    additional: tuple[str, ...] = ()
    path: str | None = None


def load_config(path: str | os.PathLike | None = None) -> StoreConfig:
    """The storage.conf named by `path`, $FLATMOUNT_CONFIG or the default file (empty if none)."""
    explicit = path is not None
    if path is None:
        env = os.environ.get("FLATMOUNT_CONFIG")
        if env:
            path, explicit = env, True
        elif os.path.exists(DEFAULT_CONFIG):
            path = DEFAULT_CONFIG
        else:
            return StoreConfig()
    path = os.fspath(path)
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise StoreError(f"config file {path} does not exist") from None
        return StoreConfig()
    except OSError as e:
        raise StoreError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise StoreError(f"config file {path} is not valid TOML: {e}") from None
    except RecursionError:
        raise StoreError(f"config file {path} is not usable TOML: arrays or tables nested too deeply") from None
    storage = data.get("storage", {})
    if not isinstance(storage, dict):
        raise StoreError(f"{path}: [storage] must be a table")

    def path_value(key: str, value: Any) -> str:
        if not isinstance(value, str) or not os.path.isabs(value) or "\0" in value:
            shown = repr(value) if isinstance(value, str | int | float | bool) else type(value).__name__
            raise StoreError(f"{path}: {key} must be an absolute path, not {shown[:200]}")
        return os.path.normpath(value)

    root = storage.get("root", storage.get("graphroot"))
    runroot = storage.get("runroot")
    options = storage.get("options", {})
    if not isinstance(options, dict):
        raise StoreError(f"{path}: [storage.options] must be a table")
    ais = options.get("additionalimagestores", [])
    if not isinstance(ais, list):
        raise StoreError(f"{path}: additionalimagestores must be a list of paths")
    return StoreConfig(
        root=path_value("root", root) if root is not None else None,
        runroot=path_value("runroot", runroot) if runroot is not None else None,
        additional=tuple(path_value("additionalimagestores", a) for a in ais),
        path=path,
    )


def default_root() -> str:
    if os.geteuid() == 0:
        return "/var/lib/flatmount"
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "flatmount")


def default_runroot() -> str:
    if os.geteuid() == 0:
        return "/run/flatmount"
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return os.path.join(base, "flatmount")
    return f"/tmp/flatmount-{os.geteuid()}"
