"""`flatmount demo`: the whole data flow on the bundled example image."""

from __future__ import annotations

import argparse


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo",
                       help="import, flatten, mount, list, diff and report on the example image",
                       description="Runs the whole data flow on the bundled example (flatmount/examples/demo-oci) in a throwaway store "
                                   "(or in --root if given) and unmounts at the end.  Needs root.")
    p.add_argument("--root", default=argparse.SUPPRESS,
                   help="run in this store directory and keep it (default: a throwaway one)")
    p.add_argument("--example", help="OCI layout with tags demo-base and demo (default: the bundled one)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from flatmount.demo import run_demo

    return run_demo(example=args.example, root=getattr(args, "root", None))
