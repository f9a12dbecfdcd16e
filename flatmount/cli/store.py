"""`flatmount pull|images|layers|inspect|tag|rmi`: the store's image records.

`rmi` removes records only: by name it untags that name (the image goes with its last name), by id it
removes the image with all its names; layers of the primary store that no remaining image uses go
with it (record, then file).  Object files are left for `gc`.
"""

from __future__ import annotations

import argparse
import sys


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("pull", parents=[common], help="import an image into the primary store",
                       description="Import an image: oci:DIR[:TAG], tar:FILE (tar, .gz, .zst; - for "
                                   "stdin), dir:PATH, containers-storage:IMAGE, docker://REF, "
                                   "oci-archive:, docker-archive: (and skopeo's other transports, "
                                   "through skopeo), a registry image NAME[:TAG] (short names by "
                                   "registries.conf), or a bare path. With --json, registry pulls "
                                   "write progress events as JSON lines on stderr.")
    p.add_argument("source", metavar="SOURCE",
                   help="oci:DIR[:TAG], tar:FILE, dir:PATH, containers-storage:[GRAPHROOT]IMAGE, "
                        "docker://REF, oci-archive:, docker-archive:, NAME[:TAG] or a path")
    p.add_argument("--name", help="name the image (default: the OCI tag, if any)")
    from flatmount.cli.registry_opts import add_registry_options

    add_registry_options(p)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("images", parents=[common], help="list images (primary, then additional stores)",
                       description="List every image with its names; CREATED is the image's own "
                                   "creation time (its config's), else when it was imported.")
    p.set_defaults(func=cmd_images)

    p = sub.add_parser("layers", parents=[common], help="list layers (primary, then additional stores)",
                       description="List every layer record: id, parent, diff id, size, inode count, "
                                   "and the store that holds it.")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("inspect", parents=[common], help="show an image (or layer) record as JSON",
                       description="Print the record of an image (name, id or id prefix) with its layer "
                                   "chain; a layer id works too.  The output is always JSON.")
    p.add_argument("ref", metavar="NAME|ID", help="image name, id or unique id prefix, or a layer id")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("tag", parents=[common], help="add a name to an image",
                       description="Give IMAGE the name NAME (`:latest` added when it has no tag); the "
                                   "name moves if another image had it.  NAME follows the reference "
                                   "grammar podman uses.")
    p.add_argument("image", metavar="IMAGE", help="image name, id or unique id prefix")
    p.add_argument("name", metavar="NAME", help="new name: [HOST[:PORT]/]PATH[:TAG]")
    p.set_defaults(func=cmd_tag)

    p = sub.add_parser("rmi", parents=[common], help="remove image names / images (objects: see gc)",
                       description="By name, remove that name (the image goes with its last name); by "
                                   "id, remove the image with its names (one with several names only "
                                   "with --force, as podman).  Unused layers go too; objects are left "
                                   "for gc.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image name, id or unique id prefix")
    p.add_argument("-f", "--force", action="store_true",
                   help="remove an image given by id even if it has several names")
    p.set_defaults(func=cmd_rmi)


def _short(i: str | None) -> str:
    return i[:12] if i else "-"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def cmd_pull(args: argparse.Namespace) -> int:
    from flatmount.cli import open_store, print_json, quiet, want_json
    from flatmount.cli import progress as cli_progress
    from flatmount.cli.registry_opts import registry_events, registry_options
    from flatmount.pull import TerminalProgress, pull

    progress = TerminalProgress() if sys.stderr.isatty() and not quiet(args) else None
    events = registry_events(args)
    try:
        with cli_progress(args), open_store(args) as store:
            result = pull(store, args.source, args.name, progress=progress,
                          registry=registry_options(args), events=events)
            unverified = _unverified_layers(store, result.imported + result.present)
    finally:
        if progress is not None:
            progress.done()
        if events is not None:
            events.done()
    if want_json(args):
        print_json(result)
    else:
        note = " (UNVERIFIED: its content is not proven to match its diff_id; see fsck)"
        for lid in result.present if not quiet(args) else ():
            print(f"layer {lid[:12]}: already present{note if lid in unverified else ''}", file=sys.stderr)
        for lid in result.imported if not quiet(args) else ():
            print(f"layer {lid[:12]}: imported{note if lid in unverified else ''}", file=sys.stderr)
        print(result.image.id)
    return 0


def _unverified_layers(store, ids) -> set[str]:
    """Those of `ids` recorded as unverified (flatmount.store.records.unverified_chain_id)."""
    from flatmount.store.records import layer_is_unverified

    out = set()
    for layer in store.layers():
        if layer.id in ids and layer_is_unverified(layer.id, layer.parent, layer.diff_id):
            out.add(layer.id)
    return out


def cmd_images(args: argparse.Namespace) -> int:
    from flatmount.cli import open_store, print_json, print_table, want_json

    with open_store(args, readonly=True) as store:
        images = store.images()
    if want_json(args):
        print_json(images)
        return 0
    rows = []
    for im in images:
        where = "primary" if im.store_root == str(store.root) else im.store_root
        for n in im.names or ("<none>",):
            rows.append((n, _short(im.id), _short(im.top_layer), im.created or "-", where))
    print_table(rows, ("NAME", "IMAGE ID", "TOP LAYER", "CREATED", "STORE"))
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    from flatmount.cli import open_store, print_json, print_table, want_json

    with open_store(args, readonly=True) as store:
        layers = store.layers()
    if want_json(args):
        print_json(layers)
        return 0
    rows = [(_short(r.id), _short(r.parent), (r.diff_id or "-")[:19], _size(r.diff_size),
             "-" if r.inodes is None else r.inodes, r.created or "-",
             "primary" if r.store_root == str(store.root) else r.store_root) for r in layers]
    print_table(rows, ("LAYER ID", "PARENT", "DIFF ID", "SIZE", "INODES", "CREATED", "STORE"))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from flatmount.cli import open_store, print_json
    from flatmount.errors import NotFoundError

    with open_store(args, readonly=True) as store:
        try:
            image = store.resolve_image(args.ref)
        except NotFoundError as image_error:
            lid = args.ref.removeprefix("sha256:")
            matches = [r for r in store.layers() if len(lid) >= 3 and r.id.startswith(lid)]
            if len(matches) != 1:
                raise image_error from None
            print_json({"layer": matches[0]})
            return 0
        chain = store.layer_chain(image.top_layer) if image.top_layer else []
    print_json({"image": image, "layers": chain})
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    from flatmount.cli import open_store, print_json, want_json

    with open_store(args) as store:
        image = store.tag(args.image, args.name)
    if want_json(args):
        print_json(image)
    return 0


def cmd_rmi(args: argparse.Namespace) -> int:
    from flatmount.cli import open_store, print_json, want_json

    with open_store(args) as store:
        results = [store.remove_image(ref, refuse_several_names=not args.force) for ref in args.images]
    if want_json(args):
        print_json(results)
        return 0
    for r in results:
        for n in r.untagged:
            print(f"Untagged: {n}")
        if r.deleted:
            print(f"Deleted: {r.image_id}")
    return 0
