"""The parser-free path for plain `flatmount mount IMAGE` / `umount DIR` command lines (start-up time:
argparse with gettext and locale is about 13 M instructions, a fifth of a `mount`).

It answers only a command line it understands completely: global options, then `mount` or `umount`,
then that command's positionals and options, each option spelled exactly (`--root DIR` or
`--root=DIR`).  Anything else -- a help or version request, an abbreviation, a value that starts with
`-`, `--`, a missing or extra argument, -q with -v, any unknown word -- returns None and the argparse
parser (flatmount.cli.parser) answers, with its own result, messages and exit codes.  What this path
returns is what argparse returns for the same words (tests/test_cli_startup.py compares the two on
generated command lines, and its option table against the argparse definitions in
flatmount/cli/mount.py).
"""

from __future__ import annotations

from types import SimpleNamespace

# global flags (before the command word): option -> dest
_GLOBAL_FLAGS = {"-q": "quiet", "--quiet": "quiet", "-v": "debug", "--debug": "debug", "--json": "json"}
# store selection: option -> dest (taken before and after the command word; after wins, as in argparse)
_STORE_VALUES = {"--config": "config", "--root": "root", "--runroot": "runroot",
                 "--additional-store": "additional_stores"}
_APPEND = frozenset({"additional_stores"})

# command -> (its positional dests in order, its own flags: option -> dest, name of its cmd_ function
# in flatmount.cli.mount).  Both commands also take the store options and --json (parents=[common]).
COMMANDS: dict[str, tuple[tuple[str, ...], dict[str, str], str]] = {
    "mount": (("image",), {}, "cmd_mount"),
    "umount": (("target",), {"--lazy": "lazy", "--force": "force"}, "cmd_umount"),
}


def parse_simple(words: list[str]) -> SimpleNamespace | None:
    """The namespace argparse would return for `words`, when they are a plain mount/umount command
    line; else None (the caller asks argparse)."""
    top: dict = {}
    sub: dict = {}
    positionals: list[str] = []
    command = None
    i, n = 0, len(words)
    while i < n:
        word = words[i]
        i += 1
        if not word.startswith("-"):
            if command is None:
                if word not in COMMANDS:
                    return None
                command = word
            else:
                positionals.append(word)
            continue
        name, eq, value = word.partition("=")
        here = top if command is None else sub
        dest = _STORE_VALUES.get(name)
        if dest is not None:
            if not eq:
                if i >= n or words[i].startswith("-"):
                    return None
                value = words[i]
                i += 1
            if dest in _APPEND:
                here.setdefault(dest, []).append(value)
            else:
                here[dest] = value
            continue
        if eq:
            return None
        if name == "--json" or (command is None and name in _GLOBAL_FLAGS):
            here[_GLOBAL_FLAGS[name]] = True
        elif command is not None and name in COMMANDS[command][1]:
            here[COMMANDS[command][1][name]] = True
        else:
            return None
    if command is None:
        return None
    names, flags, func = COMMANDS[command]
    if len(positionals) != len(names) or (top.get("quiet") and top.get("debug")):
        return None
    import sys

    # by name, as flatmount.cli.parser loads the areas (the dispatcher imports no area itself); with
    # __import__, not importlib: that package and the warnings it loads are not needed here
    __import__("flatmount.cli.mount")
    area = sys.modules["flatmount.cli.mount"]
    ns = {"quiet": False, "debug": False, **top, "command": command, **dict.fromkeys(flags.values(), False),
          **sub, **dict(zip(names, positionals, strict=True)), "func": getattr(area, func)}
    return SimpleNamespace(**ns)
