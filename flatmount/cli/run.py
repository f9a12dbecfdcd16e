"""`flatmount bundle|run|ps|stop|rm`: containers of flattened images on runc (or crun).

Exit status of `run`: the container process's (128+N after signal N); 125 when flatmount itself
fails before the container runs is not used: a FlatmountError exits 3 like every command.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # (argparse only where a parser is built: `run` is parsed without it, cli.fastparse)

if TYPE_CHECKING:  # pragma: no cover
    import argparse


def _container_options(p: argparse.ArgumentParser) -> None:
    import argparse

    p.add_argument("--net", "--network", dest="net", default="loopback",
                   choices=("none", "loopback", "host"),
                   help="network: own namespace with lo up (loopback, default), lo down (none), or the "
                        "host's")
    p.add_argument("-e", "--env", action="append", default=[], metavar="K=V", help="set a variable")
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory (default: the image's)")
    p.add_argument("-u", "--user", metavar="UID[:GID]",
                   help="user (name or id, resolved in the image's /etc/passwd and /etc/group)")
    p.add_argument("-v", "--volume", action="append", default=[], metavar="HOST:CTR[:ro]",
                   help="bind-mount a host path (repeatable)")
    p.add_argument("--tmpfs", action="append", default=[], metavar="PATH", help="a tmpfs at PATH")
    p.add_argument("--entrypoint", metavar="CMD", help="replace the image's entrypoint")
    p.add_argument("--hostname", metavar="NAME", help="hostname (default: the container id)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...",
                   help="command (replaces the image's Cmd)")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    import argparse

    p = sub.add_parser(
        "bundle", parents=[common], help="mount an image and write an OCI runtime bundle for it",
        description="Mount IMAGE privately (leased, as `mount` does) and write an OCI runtime bundle at "
                    "DIR (config.json from the image config and the options; read-only root).  "
                    "`runc run -b DIR ID` runs it.  `flatmount bundle --remove DIR` unmounts it.")
    p.add_argument("--remove", action="store_true", help="unmount the bundle at DIR and remove it")
    p.add_argument("--force", action="store_true",
                   help="with --remove: even while a container runc made of it runs (its lease stays, "
                        "detached, until that container is gone)")
    p.add_argument("image", metavar="IMAGE|DIR", help="image (or, with --remove, the bundle dir)")
    p.add_argument("dir", metavar="DIR", nargs="?", help="the new bundle directory (must be empty or absent)")
    _container_options(p)
    p.set_defaults(func=cmd_bundle)

    p = sub.add_parser(
        "run", parents=[common], help="run a container of an image (runc), read-only root",
        description="Bundle IMAGE, then `runc create`, set up the network, `runc start`, wait, clean up.  "
                    "The exit status is the container's (128+N after signal N).")
    p.add_argument("--rm", action="store_true", help="remove the container's record when it exits")
    p.add_argument("--name", metavar="ID", help="container id (default: random)")
    p.add_argument("-d", "--detach", action="store_true", help="start it and print its id")
    p.add_argument("-t", "--tty", action="store_true", help="give the container a terminal")
    p.add_argument("-i", "--interactive", action="store_true", help="accepted: stdin is always passed")
    p.add_argument("--runtime", default="runc", choices=("runc", "crun"), help="OCI runtime")
    p.add_argument("image", metavar="IMAGE", help="image name or id to run")
    _container_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("net-hook", help=argparse.SUPPRESS,
                       description="OCI runtime hook (createRuntime): set up the network of the container "
                                   "whose state the runtime gives on stdin.")
    p.add_argument("mode", choices=("none", "loopback", "host"), help="the network mode to set up")
    p.set_defaults(func=cmd_net_hook)

    p = sub.add_parser("ps", parents=[common], help="list containers",
                       description="List the containers `run` started (running ones; -a: stopped ones too) "
                                   "with their image, status and command.")
    p.add_argument("-a", "--all", action="store_true", help="stopped ones too")
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("stop", parents=[common], help="stop containers (SIGTERM, then SIGKILL)",
                       description="Stop running containers: SIGTERM, then SIGKILL after --time seconds; "
                                   "their mounts and leases are released.")
    p.add_argument("-t", "--time", type=float, default=10.0, metavar="SECONDS",
                   help="wait this long before SIGKILL (default 10)")
    p.add_argument("ids", nargs="+", metavar="ID", help="container id")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("rm", parents=[common], help="remove stopped containers",
                       description="Remove the records of stopped containers (-f: stop running ones first).")
    p.add_argument("-f", "--force", action="store_true", help="kill running ones first")
    p.add_argument("ids", nargs="+", metavar="ID", help="container id")
    p.set_defaults(func=cmd_rm)


def split_late(words: list[str]) -> tuple[list[str], list[str]]:
    """(option words, command words) of what follows `run`'s or `bundle`'s positionals (`args.cmd`):
    options come first and end at `--`; a first word that is no option starts the command, whatever
    follows it.  (argparse drops a `--` written right after the positionals, so a later `--` is the
    command's own: `run IMAGE -- sh -c 'echo "$@"' -- a b`.)"""
    if not words:
        return [], []
    if words[0] == "--":
        return [], words[1:]
    if not words[0].startswith("-"):
        return [], words
    if "--" in words:
        i = words.index("--")
        return words[:i], words[i + 1:]
    return words, []


def _late_options(args: argparse.Namespace) -> list[str]:
    """The command after the positionals; options written between them and `--` (as in `bundle IMAGE
    DIR --net none -- CMD`) are parsed into `args`."""
    late_words, cmd = split_late(list(args.cmd))
    if late_words:
        import argparse

        late = argparse.ArgumentParser(prog="flatmount", add_help=False)
        _container_options(late)
        ns = late.parse_args(late_words)
        for k, v in vars(ns).items():
            if k == "cmd":
                continue
            if isinstance(v, list):
                setattr(args, k, getattr(args, k) + v)
            elif v != late.get_default(k):
                setattr(args, k, v)
    return cmd


def options_from(args: argparse.Namespace, terminal: bool = False):
    from flatmount.run.runspec import RunOptions, Volume

    cmd = _late_options(args)
    return RunOptions(command=tuple(cmd),
                      entrypoint=(args.entrypoint,) if args.entrypoint else None,
                      env=tuple(args.env), workdir=args.workdir, user=args.user, net=args.net,
                      volumes=tuple(Volume.parse(v) for v in args.volume), tmpfs=tuple(args.tmpfs),
                      hostname=args.hostname, terminal=terminal)


def cmd_bundle(args: argparse.Namespace) -> int:
    from flatmount.cli import open_store, print_json, want_json
    from flatmount.run.bundle import create_bundle, remove_bundle

    store = open_store(args)
    if args.remove:
        if args.dir is not None:
            print("flatmount: bundle --remove takes one DIR", file=sys.stderr)
            return 2
        remove_bundle(store, args.image, force=args.force)
        return 0
    if args.dir is None:
        print("flatmount: bundle needs IMAGE and DIR", file=sys.stderr)
        return 2
    b = create_bundle(store, args.image, args.dir, options_from(args))
    if want_json(args):
        print_json(b)
    else:
        print(b.dir)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from flatmount.cli import open_store, print_json, want_json
    from flatmount.run.container import run

    store = open_store(args)
    res = run(store, args.image, options_from(args, terminal=args.tty), name=args.name, rm=args.rm,
              detach=args.detach, runtime=args.runtime)
    if args.detach:
        if want_json(args):
            print_json(res)
        else:
            print(res.id)
        return 0
    if want_json(args):
        print_json(res)
    return res.exit_status or 0


def cmd_ps(args: argparse.Namespace) -> int:
    from flatmount.cli import open_store, print_json, print_table, want_json
    from flatmount.run.container import list_containers

    cs = list_containers(open_store(args), all_=args.all)
    if want_json(args):
        print_json(cs)
        return 0
    import time

    print_table([(c.id, c.image[:40], c.status + (f" ({c.exit_status})" if c.exit_status is not None else ""),
                  c.pid or "", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.created or 0)))
                 for c in cs], ("CONTAINER ID", "IMAGE", "STATUS", "PID", "CREATED"))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from flatmount.cli import open_store
    from flatmount.run.container import stop

    store = open_store(args)
    for cid in args.ids:
        stop(store, cid, timeout=args.time)
        print(cid)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from flatmount.cli import open_store
    from flatmount.run.container import remove

    store = open_store(args)
    for cid in args.ids:
        print(remove(store, cid, force=args.force))
    return 0


def cmd_net_hook(args: argparse.Namespace) -> int:
    """Called by the runtime with the container's state (JSON, `pid` of its init) on stdin."""
    import json

    from flatmount.errors import FlatmountError
    from flatmount.run import net

    try:
        pid = int(json.load(sys.stdin)["pid"])
    except (ValueError, KeyError, TypeError, RecursionError):
        raise FlatmountError("net-hook: expected the runtime's state JSON (with `pid`) on stdin") from None
    net.network(args.mode).setup(pid)
    return 0
