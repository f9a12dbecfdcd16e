"""`flatmount diff A B`: what changed between two images, from their metadata (no mount, no object
reads), printed like `podman image diff`; optionally the layer tar that turns A into B."""

from __future__ import annotations

import argparse
import os
import sys

COMPRESSION_BY_SUFFIX = ((".tar", None), (".tar.gz", "gzip"), (".tgz", "gzip"), (".tar.zst", "zstd"))


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "diff", parents=[common], help="list what changed from image A (old) to B (new), no mount",
        description="List the paths that differ from image A to image B as `podman image diff` does "
                    "(`A`dded, `C`hanged, `D`eleted; parents of added/deleted paths are `C`). A and B are "
                    "image names or ids in the store, or paths of EROFS image files (with a slash: ./FILE; "
                    "a name is an image name first). The order is git's (OLD NEW), the reverse of "
                    "`podman image diff NEW OLD`. Names are printed C-quoted like git when they hold "
                    "control characters or invalid UTF-8 (--json is exact). Exit status 0, or 1 "
                    "with --exit-code when they differ.")
    p.add_argument("a", metavar="A", help="the old image: name/id, or an EROFS image file (./FILE)")
    p.add_argument("b", metavar="B", help="the new image: name/id, or an EROFS image file (./FILE)")
    p.add_argument("--exit-code", action="store_true", help="exit with status 1 when A and B differ")
    p.add_argument("--strict", action="store_true",
                   help="compare every field exactly: all xattrs (not only security.capability and "
                        "user.*), exact mtimes, hardlink groups")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="also write an OCI layer that turns A into B: FILE.tar, .tar.gz/.tgz or .tar.zst")
    p.add_argument("--objects", action="append", metavar="DIR",
                   help="object dir holding file content for --output (repeatable; default: the store's)")
    p.set_defaults(func=cmd_diff, diff_parser=p)


def compression_for(path: str) -> str | None:
    """The layer compression named by an output file's suffix."""
    for suffix, compression in sorted(COMPRESSION_BY_SUFFIX, key=lambda x: -len(x[0])):
        if path.endswith(suffix):
            return compression
    raise ValueError(path)


def cmd_diff(args: argparse.Namespace) -> int:
    from flatmount.cli import open_store, print_json, want_json
    from flatmount.diff import ImageIndex, changes, export_layer

    compression = None
    if args.output is not None:
        try:
            compression = compression_for(args.output)
        except ValueError:
            args.diff_parser.error("--output must end in .tar, .tar.gz, .tgz or .tar.zst")
        from flatmount.errors import FlatmountError
        from flatmount.safepath import check_output

        # before the (possibly long) work: the directory exists, only a new or regular file is written
        where = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(where):
            raise FlatmountError(f"cannot write {args.output}: directory {where} does not exist")
        check_output(args.output)
    store = None
    sides = []
    for ref in (args.a, args.b):
        if "/" in ref and os.path.isfile(ref):    # a path with a slash that is a file: an image file
            sides.append({"ref": ref, "image": os.path.abspath(ref)})
            continue
        if store is None:
            store = open_store(args)
        from flatmount.errors import NotFoundError
        from flatmount.flatten import flatten_image

        try:  # anything else is an image name first, even where a file of that name exists
            store.resolve_image(ref)
        except NotFoundError as e:
            if os.path.isfile(ref):
                raise NotFoundError(f"{e}; to compare the image file {ref}, write it with a slash: "
                                    f"./{ref}") from None
            raise
        flat = flatten_image(store, ref)
        sides.append({"ref": ref, "id": store.resolve_image(ref).id, "image": flat.path})
    index_a = ImageIndex.for_image(sides[0]["image"])
    index_b = ImageIndex.for_image(sides[1]["image"])
    result = changes(index_a, index_b, strict=args.strict)
    layer = None
    if args.output is not None:
        dirs = args.objects
        if not dirs:
            dirs = (store if store is not None else open_store(args, readonly=True)).object_dirs()
        from flatmount.cli import progress

        with progress(args):
            layer = export_layer(index_a, index_b, args.output, dirs, compression)
    if want_json(args):
        print_json({"a": sides[0], "b": sides[1], "differ": bool(result),
                    "changes": [c.to_json() for c in result], "layer": layer})
    else:
        from flatmount.quoting import quote_path

        out = sys.stdout.buffer  # one line per change: names that could break or fake a line are quoted
        out.write(b"".join(c.kind.encode() + b" " + quote_path(c.path) + b"\n" for c in result))
        out.flush()
        if layer is not None:
            print(f"wrote {args.output}: {layer.entries} entries, {layer.whiteouts} whiteouts, "
                  f"{layer.opaque_dirs} opaque dirs, {layer.size} bytes, diff_id {layer.diff_id}",
                  file=sys.stderr)
    return 1 if args.exit_code and result else 0
