"""`flatmount` command line: parse arguments, call the library, print its result.

Each area registers its subcommands from `flatmount/cli/<area>.py`; those modules import the
library lazily inside their `cmd_*` functions so that start-up stays cheap.

Exit codes: 0 success; 1 differences found (only `diff --exit-code`); 2 usage error; 3 a
`FlatmountError`/`ObjectStoreError` (message on stderr, no traceback).
"""

from __future__ import annotations

import sys

from objects.lazy import lazy_names

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: CLI start-up, see objects/lazy.py)

if TYPE_CHECKING:  # pragma: no cover
    import argparse
    from collections.abc import Callable, Sequence
    from typing import Any, NoReturn

# The parser itself lives in flatmount.cli.parser (argparse is imported only when a command line
# needs it); its names stay reachable here as before (`cli.build_parser`, `from flatmount.cli import
# json_parser`).
_PARSER_NAMES = frozenset({"AREAS", "STORE_OPTIONS", "store_parser", "json_parser", "common_parser",
                           "version_text", "build_parser", "_build_parser", "_check_options", "_Retry",
                           "_OneCommandParser", "_OneCommandAction", "_Skipped", "_SKIPPED",
                           "_VersionAction", "_command_word"})


__getattr__ = lazy_names(__name__, globals(), dict.fromkeys(_PARSER_NAMES, ".parser"))


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


_stores: list = []   # the stores open_store() opened for the running command; closed when it ends


def open_store(args: argparse.Namespace, *, readonly: bool = False):
    """The store chosen by --config/--root/--runroot/--additional-store; main() closes it when the
    command ends."""
    from flatmount.api import open_store as _open

    store = _open(
        getattr(args, "root", None),
        additional=getattr(args, "additional_stores", None),
        runroot=getattr(args, "runroot", None),
        config=getattr(args, "config", None),
        readonly=readonly,
    )
    _stores.append(store)
    return store


def _close_stores() -> None:
    """Close what open_store() opened (its DB checkpoints its WAL, its derived-file writers finish)."""
    while _stores:
        _stores.pop().close()


def want_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def to_jsonable(obj: Any) -> Any:
    """Records (flatmount.record) and dataclasses, bytes, paths and sets as JSON values (bytes as text
    with surrogateescape)."""
    import os

    fields = getattr(type(obj), "__record_specs__", None)   # (by its own field list: no `dataclasses`)
    if fields is not None:
        return {name: to_jsonable(getattr(obj, name)) for name in fields}
    if hasattr(type(obj), "__dataclass_fields__"):
        import dataclasses

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
    it.  A plain `mount`/`umount` command line is answered without argparse (flatmount.cli.fastparse:
    start-up time); anything else, including every error and help request, by the argparse parser
    (flatmount.cli.parser), which builds only the parser of the command it names when that suffices."""
    words = sys.argv[1:] if argv is None else list(argv)
    from flatmount.cli.fastparse import parse_simple

    args = parse_simple(words)
    if args is not None:
        return args
    from flatmount.cli.parser import parse_words

    return parse_words(words)


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


def run() -> NoReturn:
    """The `flatmount` process (the console script, `python -m flatmount`): main() on this process's
    command line, then exit with its code.

    The end is what the interpreter's own is, minus its teardown (freeing every module and object
    one by one, then the final collections: 3-4 ms of every command, a sixth of a `flatmount mount`
    over the interpreter's own start), which the kernel does at once with the process.  Taken only
    when nothing depends on the teardown: no other thread (the interpreter would join it), no trace
    or profile function, no -i or -X dev, no store connection left open (main() closed them: each
    DB's WAL is checkpointed as always).  The atexit callbacks run as they would (coverage, a
    caller's own, the environment's), then stdout and stderr are flushed; if flushing fails, the
    interpreter ends the process as usual and reports it."""
    rc = main()
    if _skip_teardown():
        import atexit

        atexit._run_exitfuncs()
        if _skip_teardown():   # (unless a callback started a thread or opened a store)
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except (OSError, ValueError):
                sys.exit(rc)
            import os

            os._exit(rc)
    sys.exit(rc)


def _skip_teardown() -> bool:
    import atexit

    if (getattr(atexit, "_run_exitfuncs", None) is None or sys.gettrace() or sys.getprofile()
            or sys.flags.dev_mode or sys.flags.inspect):
        return False
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        return False
    core = sys.modules.get("flatmount.store.core")
    return core is None or core.open_connections() == 0


def keep_interrupts() -> None:
    """Never lose a Ctrl-C: Python drops an exception raised inside a weakref callback or `__del__`
    ("Exception ignored in ..."), and a SIGINT whose handler runs there is gone: the command would
    go on (a stalled pull would wait forever).  Such a KeyboardInterrupt is delivered to the main
    thread again, a moment later (from a timer thread: raised from the hook itself, it would be
    dropped again), where it runs its course (cleanup, one line, exit).  It is sent as a real
    SIGINT to that thread: `_thread.interrupt_main` only schedules the handler, which would then
    wait for a blocking wait (a stalled layer's) to end by itself."""
    previous = sys.unraisablehook
    if getattr(previous, "keeps_interrupts", False):
        return

    def hook(unraisable) -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            import signal
            import threading

            main = threading.main_thread().ident
            threading.Timer(0.01, signal.pthread_kill, (main, signal.SIGINT)).start()
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
        try:
            return int(args.func(args) or 0)
        finally:
            _close_stores()
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
        sqlite3 = sys.modules.get("_sqlite3") or sys.modules.get("sqlite3")   # (flatmount.store.sqlite)
        if sqlite3 is not None and isinstance(e, sqlite3.Error):
            print(f"flatmount: {command}: store database error: {_one_line(str(e))}", file=sys.stderr)
            return 3
        what = {RecursionError: "input nested too deeply", MemoryError: "out of memory"}.get(type(e))
        detail = what or f"{type(e).__name__}: {_one_line(str(e))}"
        print(f"flatmount: internal error in {command}: {detail} (set {DEBUG_ENV}=1 for a traceback; "
              f"please report it)", file=sys.stderr)
        return 3


if __name__ == "__main__":  # pragma: no cover
    run()
