"""The parser-free path for plain `flatmount mount IMAGE` / `umount DIR` / `run [OPTIONS] IMAGE [-- CMD]`
command lines (start-up time: argparse with gettext and locale is about 13 M instructions, a fifth
of a `mount`; building `run`'s parser took another 9 ms, a twentieth of a container's start).

It answers only a command line it understands completely: global options, then `mount`, `umount` or
`run`, then that command's positionals and options, each option spelled exactly (`--root DIR` or
`--root=DIR`, a choice among its choices), and for `run` nothing after IMAGE but `--` and the
command.  Anything else -- a help or version request, an abbreviation, grouped short options (`-it`),
a value that starts with `-`, a missing or extra argument, -q with -v, any unknown word -- returns
None and the argparse parser (flatmount.cli.parser) answers, with its own result, messages and exit
codes.  What this path returns is what argparse returns for the same words (tests/test_cli_startup.py
compares the two on generated command lines, and its option table against the argparse definitions
in flatmount/cli/mount.py and flatmount/cli/run.py).
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
# in its area's module, the area).  Each also takes the store options and --json (parents=[common]).
COMMANDS: dict[str, tuple[tuple[str, ...], dict[str, str], str, str]] = {
    "mount": (("image",), {}, "cmd_mount", "mount"),
    "umount": (("target",), {"--lazy": "lazy", "--force": "force"}, "cmd_umount", "mount"),
    "run": (("image",), {"--rm": "rm", "-d": "detach", "--detach": "detach", "-t": "tty", "--tty": "tty",
                         "-i": "interactive", "--interactive": "interactive"}, "cmd_run", "run"),
}
# a command's options with a value: option -> (dest, default, the choices or None, whether repeated
# values are collected); `run`'s are flatmount/cli/run.py's
_RUN_VALUES: dict[str, tuple[str, object, tuple[str, ...] | None, bool]] = {
    "--name": ("name", None, None, False), "--runtime": ("runtime", "runc", ("runc", "crun"), False),
    "--net": ("net", "loopback", ("none", "loopback", "host"), False),
    "--network": ("net", "loopback", ("none", "loopback", "host"), False),
    "-e": ("env", (), None, True), "--env": ("env", (), None, True),
    "-w": ("workdir", None, None, False), "--workdir": ("workdir", None, None, False),
    "-u": ("user", None, None, False), "--user": ("user", None, None, False),
    "-v": ("volume", (), None, True), "--volume": ("volume", (), None, True),
    "--tmpfs": ("tmpfs", (), None, True), "--entrypoint": ("entrypoint", None, None, False),
    "--hostname": ("hostname", None, None, False),
}
VALUES: dict[str, dict[str, tuple[str, object, tuple[str, ...] | None, bool]]] = {"run": _RUN_VALUES}
REMAINDER = {"run": "cmd"}   # the words after `--` (argparse.REMAINDER, whose `--` argparse drops)


def parse_simple(words: list[str]) -> SimpleNamespace | None:
    """The namespace argparse would return for `words`, when they are a plain mount/umount/run
    command line; else None (the caller asks argparse)."""
    top: dict = {}
    sub: dict = {}
    positionals: list[str] = []
    command = None
    rest: list[str] | None = None   # `run`'s words after its `--`
    i, n = 0, len(words)
    while i < n:
        word = words[i]
        i += 1
        if not word.startswith("-"):
            if command is None:
                if word not in COMMANDS:
                    return None
                command = word
            elif command in REMAINDER and len(positionals) == len(COMMANDS[command][0]):
                return None   # (a command without `--`: argparse decides where options end)
            else:
                positionals.append(word)
            continue
        if word == "--" and command in REMAINDER and len(positionals) == len(COMMANDS[command][0]):
            rest = words[i:]
            break
        if command in REMAINDER and positionals:
            return None       # (an option after IMAGE: argparse takes it into the command)
        name, eq, value = word.partition("=")
        here = top if command is None else sub
        dest = _STORE_VALUES.get(name)
        own = VALUES.get(command, {}).get(name) if command is not None else None
        if dest is not None or own is not None:
            if not eq:
                if i >= n or words[i].startswith("-"):
                    return None
                value = words[i]
                i += 1
            if own is not None:
                dest, _default, choices, repeated = own
                if choices is not None and value not in choices:
                    return None
                if repeated:
                    here.setdefault(dest, []).append(value)
                else:
                    here[dest] = value
            elif dest in _APPEND:
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
    names, flags, func, area_name = COMMANDS[command]
    if len(positionals) != len(names) or (top.get("quiet") and top.get("debug")):
        return None
    import sys

    # by name, as flatmount.cli.parser loads the areas (the dispatcher imports no area itself); with
    # __import__, not importlib: that package and the warnings it loads are not needed here
    module = "flatmount.cli." + area_name
    __import__(module)
    area = sys.modules[module]
    values = {dest: list(default) if repeated else default
              for dest, default, _choices, repeated in VALUES.get(command, {}).values()}
    if command in REMAINDER:
        values[REMAINDER[command]] = rest or []
    ns = {"quiet": False, "debug": False, **top, "command": command, **dict.fromkeys(flags.values(), False),
          **values, **sub, **dict(zip(names, positionals, strict=True)), "func": getattr(area, func)}
    return SimpleNamespace(**ns)
