"""`flatmount dump IMAGE` and `flatmount mkimage`: EROFS images to and from composefs dumps and directories.

These are the store-less building blocks (like `composefs-info dump` and `mkcomposefs`); the library is
imported inside each command so `flatmount --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys


def register(sub, common: argparse.ArgumentParser) -> None:
    from flatmount.cli import json_parser

    p = sub.add_parser("dump", help="print the composefs dump of an EROFS image",
                       description="Print the composefs dump (one line per inode) of an EROFS image file.")
    p.add_argument("image", metavar="IMAGE", help="EROFS image file")
    p.set_defaults(func=cmd_dump)

    p = sub.add_parser(
        "mkimage", parents=[json_parser()], help="build an EROFS image from a dump file or a directory",
        description="Build an EROFS (composefs layout) image: `mkimage --from-dump FILE|- OUT` or "
                    "`mkimage DIR OUT [--digest-store OBJDIR]`. OUT may be `-` for stdout.",
        usage="flatmount mkimage (--from-dump FILE|- OUT | DIR OUT [--digest-store OBJDIR])")
    p.add_argument("--from-dump", metavar="FILE", help="composefs dump file (gzip ok; `-` for stdin)")
    p.add_argument("--digest-store", metavar="OBJDIR",
                   help="store regular files over 64 bytes in this object directory (DIR source only)")
    p.add_argument("paths", nargs="+", metavar="[DIR] OUT",
                   help="the directory to scan (without --from-dump), then the image file to write")
    p.set_defaults(func=cmd_mkimage, mkimage_parser=p)


def cmd_dump(args: argparse.Namespace) -> int:
    from flatmount.errors import FlatmountError
    from flatmount.image.dump import write_dump
    from flatmount.image.reader import read_tree

    try:
        root = read_tree(args.image)
    except OSError as e:
        raise FlatmountError(f"cannot read image {args.image!r}: {e.strerror}") from None
    out = sys.stdout.buffer
    write_dump(root, out)
    out.flush()
    return 0


def cmd_mkimage(args: argparse.Namespace) -> int:
    parser = args.mkimage_parser
    if args.from_dump is not None:
        if len(args.paths) != 1:
            parser.error("with --from-dump give exactly one argument: OUT")
        if args.digest_store is not None:
            parser.error("--digest-store only applies to a DIR source")
        out = args.paths[0]
    else:
        if len(args.paths) != 2:
            parser.error("give DIR OUT (or --from-dump FILE OUT)")
        out = args.paths[1]
    if out == "-" and sys.stdout.isatty():
        parser.error("refusing to write an image to a terminal")
    if out == "-" and getattr(args, "json", False):
        parser.error("--json needs an OUT file: stdout carries the image")

    from flatmount.errors import FlatmountError
    from flatmount.safepath import check_output

    if out != "-":
        check_output(out)  # before the work: only a new or regular file is ever written

    if args.from_dump is not None:
        from flatmount.image.dump import parse_dump

        if args.from_dump == "-":
            root = parse_dump(sys.stdin.buffer)
        else:
            try:
                with open(args.from_dump, "rb") as f:
                    root = parse_dump(f)
            except OSError as e:
                raise FlatmountError(f"cannot read dump {args.from_dump!r}: {e.strerror}") from None
    else:
        from flatmount.sources.directory import scan_directory

        objects = None
        if args.digest_store is not None:
            from objects import ObjectStore

            objects = ObjectStore(args.digest_store)
        root = scan_directory(args.paths[0], objects)

    from flatmount.image.writer import write_image

    if out == "-":
        write_image(root, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return 0
    try:
        write_image(root, out)
    except OSError as e:
        raise FlatmountError(f"cannot write image {out!r}: {e.strerror}") from None
    if getattr(args, "json", False):
        import os

        from flatmount.cli import print_json
        from flatmount.image.tree import count_inodes

        print_json({"output": out, "size": os.path.getsize(out), "inodes": count_inodes(root)})
    return 0
