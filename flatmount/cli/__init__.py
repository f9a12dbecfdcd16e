"""`flatmount` command line: parse arguments, call the library, print its result.

Each area registers its subcommands from `flatmount/cli/<area>.py`; those modules import the
library lazily inside their `cmd_*` functions so that start-up stays cheap.

Exit codes: 0 success; 1 differences found (only `diff --exit-code`); 2 usage error; 3 a
`FlatmountError`/`ObjectStoreError` (message on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

# in the order of the data flow: import and records, flatten and mount, containers, diff, maintenance, the
# store-less building blocks, the demo (the help lists subcommands in this order)
AREAS = ("store", "mount", "run", "diff", "maint", "image", "demo", "docs")
STORE_OPTIONS = ("config", "root", "runroot", "additional_stores")


def store_parser() -> argparse.ArgumentParser:
    """The store selection options, for subcommands that open a store."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("store selection")
    g.add_argument("--config", default=argparse.SUPPRESS,
                   help="storage.conf (default: $FLATMOUNT_CONFIG or /etc/flatmount/storage.conf)")
    g.add_argument("--root", default=argparse.SUPPRESS, help="primary store directory")
    g.add_argument("--runroot", default=argparse.SUPPRESS, help="runtime directory (mounts, leases)")
    g.add_argument("--additional-store", action="append", dest="additional_stores",
                   default=argparse.SUPPRESS, metavar="DIR",
                   help="read-only additional store (repeatable; replaces the configured list)")
    return p


def json_parser() -> argparse.ArgumentParser:
    """`--json`, for subcommands that print their result as JSON when asked."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="machine-readable output on stdout")
    return p


def common_parser() -> argparse.ArgumentParser:
    """Store selection and --json: what a subcommand that opens a store and prints a result takes."""
    return argparse.ArgumentParser(add_help=False, parents=[store_parser(), json_parser()])


def version_text() -> str:
    """`flatmount --version`: the version and which fs-verity hashing the digests use."""
    from flatmount import __version__
    from objects.digest import implementation

    return f"flatmount {__version__} (fs-verity hashing: {implementation()})"


class _VersionAction(argparse.Action):
    """--version, computed only when asked (it imports the hashing module)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The whole `flatmount` parser; store options and --json also before the subcommand name."""
    parser = _build_parser(None)
    assert parser is not None
    return parser


class _Retry(Exception):
    """The one-command parser cannot answer (a usage error, or the top-level help that lists every
    command): `main` parses again with the whole parser, which says exactly what it always said."""


class _OneCommandParser(argparse.ArgumentParser):
    """The top-level parser of `_build_parser(command)`: it hands every error, and the top-level help
    (which lists every subcommand), back to the whole parser."""

    def error(self, message: str):
        raise _Retry(message)

    def format_help(self) -> str:
        raise _Retry("help")


class _Skipped:
    """What an area's `register` gets for a command that is not about to run: accepts and ignores
    every call, so building it costs nothing."""

    def __getattr__(self, name: str):
        return self._ignore

    def __setattr__(self, name: str, value: Any) -> None:
        pass

    def _ignore(self, *args: Any, **kwargs: Any) -> _Skipped:
        return self


_SKIPPED = _Skipped()


class _OneCommandAction(argparse._SubParsersAction):
    """Subparsers that build only the parser of `wanted` (start-up: one command's options, not every
    command's, are built before it runs)."""

    wanted = ""

    def add_parser(self, name: str, **kwargs: Any):
        if name != self.wanted and self.wanted not in kwargs.get("aliases", ()):
            return _SKIPPED
        return super().add_parser(name, **kwargs)


def _command_word(argv: Sequence[str]) -> str | None:
    """The subcommand name `argv` most likely gives (the first word that is no option and no value of
    a global option), or None.  Only a guess: a wrong one costs a second parse, never a wrong result."""
    takes_value = {"--config", "--root", "--runroot", "--additional-store"}
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--":
            return None
        elif arg.startswith("-"):
            skip = arg in takes_value
        else:
            return arg
    return None


def _build_parser(command: str | None) -> argparse.ArgumentParser | None:
    """The whole parser (`command` None), or the same parser with only `command`'s subparser: the
    areas are registered in order until one has added it (None if none does).  What the second one
    parses successfully, the first parses the same way (their global options are the same and the
    command's parser is built by the same code); everything else it hands back (`_Retry`)."""
    common = common_parser()
    cls = argparse.ArgumentParser if command is None else _OneCommandParser
    parser = cls(prog="flatmount", parents=[common],
                 description="Flatten container layer chains into one EROFS image and mount it privately.")
    parser.add_argument("--version", action=_VersionAction,
                        help="print the version and whether the compiled fs-verity loop is in use")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-q", "--quiet", action="store_true",
                       help="print only results and errors (no progress, no notes on stderr)")
    noise.add_argument("-v", "--debug", action="store_true", dest="debug",
                       help="log each choice made on the way (mount path, loop device, flatten helper, "
                            "fs-verity hashing) on stderr")
    if command is None:
        sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    else:
        sub = parser.add_subparsers(dest="command", metavar="COMMAND", action=_OneCommandAction,
                                    parser_class=argparse.ArgumentParser)
        sub.wanted = command
    sub.required = True
    for area in AREAS:
        importlib.import_module(f"flatmount.cli.{area}").register(sub, common)
        if command is not None and command in sub.choices:
            return parser
    return parser if command is None else None


def _check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a global option the chosen subcommand does not take (store options on a command that
    opens no store, --json where there is no JSON to print), rather than ignore it."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sp = sub.choices[args.command]
    for a in sp._actions:   # a nested subcommand (`objects refs`) decides for itself
        if isinstance(a, argparse._SubParsersAction) and getattr(args, a.dest, None) in a.choices:
            sp = a.choices[getattr(args, a.dest)]
    accepted = {a.dest for a in sp._actions}
    for dest in (*STORE_OPTIONS, "json"):
        if hasattr(args, dest) and dest not in accepted:
            opt = "--additional-store" if dest == "additional_stores" else "--" + dest
            why = "it opens no store" if dest in STORE_OPTIONS else "it has no JSON output"
            parser.error(f"{opt} does not apply to `flatmount {args.command}`: {why}")


def _with_logging(args: argparse.Namespace, func: Callable[[argparse.Namespace], int | None]):
    """`func` run with -v (debug notes of flatmount and objects on stderr) or -q (only errors), for
    this call of main() only: a program calling main() twice keeps its own logging.  Without either,
    logging is not even imported (start-up cost)."""
    if not (args.debug or args.quiet):
        return func

    def run(a: argparse.Namespace) -> int | None:
        import logging

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("flatmount: %(levelname)s: %(message)s"))
        loggers = [logging.getLogger(name) for name in ("flatmount", "objects")]
        levels = [log.level for log in loggers]
        for log in loggers:
            log.addHandler(handler)
            log.setLevel(logging.DEBUG if args.debug else logging.ERROR)
        try:
            return func(a)
        finally:
            for log, level in zip(loggers, levels, strict=True):
                log.removeHandler(handler)
                log.setLevel(level)

    return run


def quiet(args: argparse.Namespace) -> bool:
    """-q or --json: no progress and no notes on stderr."""
    return bool(getattr(args, "quiet", False) or getattr(args, "json", False))


def progress(args: argparse.Namespace):
    """Context in which long operations draw their progress on stderr: only on a terminal, and not
    with -q or --json (flatmount.progress)."""
    from flatmount.progress import reporting

    return reporting(enabled=not quiet(args))


def open_store(args: argparse.Namespace, *, readonly: bool = False):
    """The store chosen by --config/--root/--runroot/--additional-store."""
    from flatmount.api import open_store as _open

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
    import json

    json.dump(to_jsonable(obj), sys.stdout, sort_keys=True, indent=2)
    sys.stdout.write("\n")


def print_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    """A plain aligned table, as `podman images` prints."""
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


DEBUG_ENV = "FLATMOUNT_DEBUG"   # set (non-empty) to see the traceback of an internal error


def describe_oserror(e: OSError) -> str:
    """One line for an OSError: `<strerror>: <path>[ -> <path2>]` (the errno name when no strerror)."""
    import errno as _errno

    what = e.strerror or (_errno.errorcode.get(e.errno, "") if e.errno else "") or str(e) or type(e).__name__
    paths = [p for p in (e.filename, e.filename2) if p is not None]
    if paths:
        import os

        what += ": " + " -> ".join(os.fsdecode(p) if isinstance(p, bytes | str) else str(p) for p in paths)
    return what.replace("\n", " ")


def _debug_traceback() -> None:
    """The traceback of the exception being handled, only when $FLATMOUNT_DEBUG asks for it."""
    import os

    if os.environ.get(DEBUG_ENV):
        import traceback

        traceback.print_exc()


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(no message)"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """`argv` parsed (and its global options checked against the command), as the whole parser does
    it; only the parser of the command it names is built when that suffices (start-up time)."""
    words = sys.argv[1:] if argv is None else list(argv)
    command = _command_word(words)
    parser = _build_parser(command) if command is not None else None
    if parser is not None:
        try:
            args = parser.parse_args(words)
            _check_options(parser, args)
            return args
        except _Retry:
            pass
    parser = build_parser()
    args = parser.parse_args(words)
    _check_options(parser, args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command (`_main`), with what start-up made kept out of the cyclic GC's sight.

    The interpreter's and our modules, classes and the parser live as long as the process: frozen
    (gc.freeze), they are not walked again by every collection the command's own imports trigger,
    nor by the one at exit (together a tenth of the instructions of a `flatmount mount`); objects
    are still freed by their reference counts.  With `argv` None (the command line of this process:
    the console script, `python -m flatmount`) they stay frozen to the end; a program that passes
    `argv` gets its GC state back when main() returns; one that froze objects itself is left alone.
    """
    import gc

    keep_interrupts()
    own = gc.get_freeze_count() == 0
    if own:
        gc.freeze()
    try:
        return _main(argv)
    finally:
        if own and argv is not None:
            gc.unfreeze()


def keep_interrupts() -> None:
    """Never lose a Ctrl-C: Python drops an exception raised inside a weakref callback or `__del__`
    ("Exception ignored in ..."), and a SIGINT whose handler runs there is gone: the command would
    go on (a stalled pull would wait forever).  Such a KeyboardInterrupt is delivered to the main
    thread again, a moment later (from a timer thread: raised from the hook itself, it would be
    dropped again), where it runs its course (cleanup, one line, exit)."""
    previous = sys.unraisablehook
    if getattr(previous, "keeps_interrupts", False):
        return

    def hook(unraisable) -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            import _thread
            import threading

            threading.Timer(0.01, _thread.interrupt_main).start()
            return
        previous(unraisable)

    hook.keeps_interrupts = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _main(argv: Sequence[str] | None) -> int:
    """Run one command; every failure becomes one line on stderr and exit 3, never a traceback.

    FlatmountError/ObjectStoreError carry their own message; any other OSError (a permission, a
    missing or wrong-type path the code did not anticipate) is reported with its strerror and path;
    anything else is an internal error (one line; the traceback only with $FLATMOUNT_DEBUG set).
    """
    args = parse_args(argv)
    args.func = _with_logging(args, args.func)
    from flatmount.errors import FlatmountError

    try:
        from objects.errors import ObjectStoreError
    except ImportError:  # pragma: no cover - objects is part of the same distribution
        ObjectStoreError = FlatmountError  # noqa: N806
    command = getattr(args, "command", None) or "flatmount"
    try:
        return int(args.func(args) or 0)
    except (FlatmountError, ObjectStoreError) as e:
        print(f"flatmount: {type(e).__name__}: {_one_line(str(e))}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("flatmount: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:
        _debug_traceback()
        print(f"flatmount: {command}: {_one_line(describe_oserror(e))}", file=sys.stderr)
        return 3
    except Exception as e:  # noqa: BLE001 - the last line of defence: no traceback reaches a user
        _debug_traceback()
        sqlite3 = sys.modules.get("sqlite3")
        if sqlite3 is not None and isinstance(e, sqlite3.Error):
            print(f"flatmount: {command}: store database error: {_one_line(str(e))}", file=sys.stderr)
            return 3
        what = {RecursionError: "input nested too deeply", MemoryError: "out of memory"}.get(type(e))
        detail = what or f"{type(e).__name__}: {_one_line(str(e))}"
        print(f"flatmount: internal error in {command}: {detail} (set {DEBUG_ENV}=1 for a traceback; "
              f"please report it)", file=sys.stderr)
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
