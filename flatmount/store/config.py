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
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        if explicit:
            raise StoreError(f"config file {path} does not exist") from None
        return StoreConfig()
    except OSError as e:
        raise StoreError(f"cannot read config file {path}: {e.strerror}") from None
    data = simple_toml(raw)
    if data is None:   # more than the plain form: the full parser
        import tomllib

        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise StoreError(f"config file {path} is not valid TOML: not UTF-8 ({e.reason})") from None
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


# --- the plain form of a config file, without tomllib ---------------------------------------------
# `import tomllib` (re, enum, datetime and string behind it) costs a new process 8-12 ms where nothing
# preloads them, which every command that opens a store would pay where a config file exists (an
# operator's additional stores); the file is almost always the plain form of the module docstring.
# `simple_toml` reads that form only: tables with bare dotted names, bare keys, strings without escapes
# and one-line arrays of them, comments; anything else (or anything tomllib would refuse) gives None,
# and tomllib, the specification, reads the file (tests/test_store.py compares the two).

_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_CONTROL = frozenset(chr(c) for c in (*range(0x09), *range(0x0A, 0x20), 0x7F))


def _bare(name: str) -> bool:
    return bool(name) and _BARE.issuperset(name)


def _string(text: str) -> tuple[str, str] | None:
    """A basic string without escapes or a literal string at the start of `text`: (value, rest)."""
    if not text or text[0] not in "\"'":
        return None
    end = text.find(text[0], 1)
    if end < 0:
        return None
    value = text[1:end]
    if "\\" in value and text[0] == '"':
        return None
    return value, text[end + 1:]


def _value(text: str) -> tuple[object, str] | None:
    """A string or a one-line array of strings at the start of `text`: (value, rest)."""
    if text[:1] != "[":
        return _string(text)
    items: list[str] = []
    rest = text[1:].lstrip(" \t")
    while rest[:1] != "]":
        got = _string(rest)
        if got is None:
            return None
        items.append(got[0])
        rest = got[1].lstrip(" \t")
        if rest[:1] == ",":
            rest = rest[1:].lstrip(" \t")
        elif rest[:1] != "]":
            return None
    return items, rest[1:]


def simple_toml(raw: bytes) -> dict | None:
    """`tomllib.loads` of a config file in the plain form (see above), or None for any other file."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\r" in text.replace("\r\n", "\n"):
        return None
    doc: dict = {}
    table = doc
    headers: set[tuple[str, ...]] = set()
    for line in text.split("\n"):
        if _CONTROL.intersection(line.rstrip("\r")):
            return None
        line = line.strip(" \t\r")
        if not line or line[0] == "#":
            continue
        if line[0] == "[":
            end = line.find("]")
            tail = line[end + 1:].lstrip(" \t")
            parts = tuple(line[1:end].split("."))
            if end < 0 or line[1:2] == "[" or (tail and tail[0] != "#") or parts in headers \
                    or not all(map(_bare, parts)):
                return None
            headers.add(parts)
            table = doc
            for part in parts:
                table = table.setdefault(part, {})
                if not isinstance(table, dict):
                    return None
            continue
        key, eq, rest = line.partition("=")
        key = key.rstrip(" \t")
        got = _value(rest.lstrip(" \t")) if eq else None
        if got is None or not _bare(key) or key in table:
            return None
        value, tail = got
        tail = tail.lstrip(" \t")
        if tail and tail[0] != "#":
            return None
        table[key] = value
    return doc


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
