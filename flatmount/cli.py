"""`flatmount` command line: parse arguments, call the library, print its result.

Each area registers its subcommands from `flatmount/commands/<area>.py`; those modules import the
library lazily inside their `cmd_*` functions so that start-up stays cheap.

Exit codes: 0 success; 1 differences found (only `diff --exit-code`); 2 usage error; 3 a
`FlatmountError`/`ObjectStoreError` (message on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

AREAS = ("image", "store", "mount", "diff", "maint", "demo", "run")


def common_parser() -> argparse.ArgumentParser:
    """Options every subcommand accepts (after the subcommand name too)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("store selection")
    g.add_argument("--config", default=argparse.SUPPRESS,
                   help="storage.conf (default: $FLATMOUNT_CONFIG or /etc/flatmount/storage.conf)")
    g.add_argument("--root", default=argparse.SUPPRESS, help="primary store directory")
    g.add_argument("--runroot", default=argparse.SUPPRESS, help="runtime directory (mounts, leases)")
    g.add_argument("--additional-store", action="append", dest="additional_stores",
                   default=argparse.SUPPRESS, metavar="DIR",
                   help="read-only additional store (repeatable; replaces the configured list)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="machine-readable output on stdout")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = common_parser()
    parser = argparse.ArgumentParser(prog="flatmount", parents=[common],
                                     description="Flatten container layer chains into one EROFS image "
                                                 "and mount it privately.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for area in AREAS:
        importlib.import_module(f"flatmount.commands.{area}").register(sub, common)
    return parser


def open_store(args: argparse.Namespace, *, readonly: bool = False):
    """The store chosen by --config/--root/--runroot/--additional-store."""
    from flatmount.store import open_store as _open

    return _open(
        getattr(args, "root", None),
        additional=getattr(args, "additional_stores", None),
        runroot=getattr(args, "runroot", None),
        config=getattr(args, "config", None),
        readonly=readonly,
    )


def want_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def to_jsonable(obj: Any) -> Any:
    """dataclasses, bytes, paths and sets as JSON values (bytes as text with surrogateescape)."""
    import dataclasses
    import os

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(to_jsonable(k)): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        items = [to_jsonable(v) for v in obj]
        return sorted(items, key=repr) if isinstance(obj, set | frozenset) else items
    if isinstance(obj, bytes):
        return os.fsdecode(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def print_json(obj: Any) -> None:
    json.dump(to_jsonable(obj), sys.stdout, sort_keys=True, indent=2)
    sys.stdout.write("\n")


def print_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    """A plain aligned table, as `podman images` prints."""
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from flatmount.errors import FlatmountError

    try:
        from objects.errors import ObjectStoreError
    except ImportError:  # pragma: no cover - objects is part of the same distribution
        ObjectStoreError = FlatmountError  # noqa: N806
    try:
        return int(args.func(args) or 0)
    except (FlatmountError, ObjectStoreError) as e:
        print(f"flatmount: {type(e).__name__}: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("flatmount: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
