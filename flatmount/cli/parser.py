"""The `flatmount` argument parser (argparse): the whole parser, the one-command parser that start-up
builds, and the check of global options against the command.

Kept apart from `flatmount.cli` so that a command the parser-free path (flatmount.cli.fastparse)
answers never imports argparse (with gettext and locale, about 13 M instructions of start-up).
"""

from __future__ import annotations

import argparse
import gettext
import importlib


def _translate_once() -> None:
    """argparse's messages through one translation looked up now: argparse calls `gettext.gettext`
    for every parser and option it builds, and each call searches the locale dirs again when no
    catalogue is found (16 searches, ~4 ms of building `run`'s parser); the catalogue (or the lack
    of one) is the same each time within a process."""
    domain = gettext.textdomain()
    t = gettext.translation(domain, gettext.bindtextdomain(domain), fallback=True)
    argparse._ = t.gettext
    argparse.ngettext = t.ngettext


_translate_once()

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: CLI start-up, see objects/lazy.py)

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Sequence
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


def parse_words(words: list[str]) -> argparse.Namespace:
    """`words` parsed (and its global options checked against the command), as the whole parser does
    it; only the parser of the command it names is built when that suffices (start-up time)."""
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
