"""`flatmount completion bash`: the shell completion script, generated from the parser (as podman's
`completion` command).  The man page comes from the same walk: `python3 -m flatmount.cli.manpage OUTDIR`."""

from __future__ import annotations

import argparse


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("completion", help="print the shell completion script",
                       description="Print the completion script for SHELL on stdout, e.g. "
                                   "`flatmount completion bash > /etc/bash_completion.d/flatmount`.")
    p.add_argument("shell", metavar="SHELL", choices=("bash",), help="the shell (bash)")
    p.set_defaults(func=cmd_completion)


def cmd_completion(args: argparse.Namespace) -> int:
    from flatmount.cli import build_parser
    from flatmount.cli.manpage import bash_completion

    print(bash_completion(build_parser()), end="")
    return 0
