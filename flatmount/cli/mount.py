"""`flatmount` mount commands.

Two layers live here, each in its own section:
- low-level (flatmount.kernel.kmount, no store): `mount-image`, `umount-image`;
- store-level (`mount`, `umount`, `mounts`, `cleanup`): added by the store/mount worker.
"""

from __future__ import annotations

TYPE_CHECKING = False  # (typing is slow to import: CLI start-up, see objects/lazy.py)

if TYPE_CHECKING:  # pragma: no cover
    import argparse


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add this area's subcommands to the `flatmount` parser (store-level first: the data flow)."""
    register_store(sub, common)
    register_kernel(sub, common)


# --- low-level kernel mounts (flatmount.kernel.kmount) ----------------------------------------------------
def register_kernel(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from flatmount.cli import json_parser

    p = sub.add_parser(
        "mount-image", parents=[json_parser()],
        help="mount an EROFS metadata image read-only, its files served from object dirs",
        description="Mount IMAGE (EROFS, composefs layout) at MOUNTPOINT: overlayfs ro,nodev,nosuid "
                    "with each --objects DIR as a data-only lower layer; the erofs mount itself stays "
                    "attached nowhere.  No store is involved (see `flatmount mount` for images by name).")
    p.add_argument("image", metavar="IMAGE", help="EROFS image file")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="existing directory")
    p.add_argument("--objects", action="append", default=[], metavar="DIR",
                   help="object directory holding the image's file contents (XX/<62 hex> layout); "
                        "needed (at least one), repeatable, searched in order")
    p.add_argument("--loop", action="store_true",
                   help="always mount the image through a loop device (default: only when the kernel "
                        "refuses the file itself)")
    p.set_defaults(func=cmd_mount_image)

    p = sub.add_parser(
        "umount-image", parents=[json_parser()], help="unmount what mount-image mounted",
        description="Unmount MOUNTPOINT; the erofs layer and any loop device are freed with it.  Only a "
                    "mount that flatmount makes (a read-only overlay of an EROFS image with data-only "
                    "object layers, or an erofs mount of a composefs image) is unmounted, unless --force.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="where mount-image mounted the image")
    p.add_argument("--lazy", action="store_true",
                   help="detach now even if busy; freed when the last user goes (MNT_DETACH)")
    p.add_argument("--force", action="store_true",
                   help="unmount whatever is mounted at MOUNTPOINT, even if flatmount did not mount it")
    p.set_defaults(func=cmd_umount_image)


def cmd_mount_image(args: argparse.Namespace) -> int:
    from flatmount.cli import print_json, want_json
    from flatmount.kernel.kmount import mount_image

    mount_image(args.image, args.mountpoint, args.objects, loop=True if args.loop else None)
    if want_json(args):
        import os

        print_json({"image": os.path.abspath(args.image), "mountpoint": os.path.abspath(args.mountpoint),
                    "objects": [os.path.abspath(d) for d in args.objects]})
    return 0


def cmd_umount_image(args: argparse.Namespace) -> int:
    from flatmount.cli import print_json, want_json
    from flatmount.kernel.kmount import umount_image

    umount_image(args.mountpoint, lazy=args.lazy, only_ours=not args.force)
    if want_json(args):
        import os

        print_json({"mountpoint": os.path.abspath(args.mountpoint), "unmounted": True})
    return 0


# --- store-level mounts (flatmount.store.core leases) ---------------------------------------------------
# `mount`, `umount`, `mounts`, `cleanup` go here; register them from register() above.
def register_store(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("flatten", parents=[common],
                       help="write (or find cached) the flattened EROFS image of an image; prints it",
                       description="Flatten IMAGE's layer chain (across the primary and additional "
                                   "stores) into one EROFS image, cached per chain, and print its digest "
                                   "and path.  `mount` does this itself; this is for using the file.")
    p.add_argument("image", metavar="NAME|ID", help="image name, id or unique id prefix")
    p.set_defaults(func=cmd_flatten)

    p = sub.add_parser(
        "mount", parents=[common], help="mount an image read-only at a new private dir; prints the dir",
        description="Flatten IMAGE's layer chain (cached per top layer, across stores) and mount it "
                    "read-only at a fresh <runroot>/mounts/<id>/merged, recorded as a lease.  Unmount "
                    "with `flatmount umount`.")
    p.add_argument("image", metavar="NAME|ID", help="image name, id or unique id prefix")
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("umount", parents=[common], help="unmount a mount made by `flatmount mount`",
                       description="Unmount MERGED (or the mount with that lease id), drop its lease "
                                   "and remove its directories.  A busy mount is refused unless --lazy.")
    p.add_argument("target", metavar="MERGED|LEASE_ID",
                   help="the merged dir `flatmount mount` printed, or the lease id `flatmount mounts` shows")
    p.add_argument("--lazy", action="store_true",
                   help="if busy, detach it now (MNT_DETACH): its users keep reading, the kernel frees "
                        "it when the last one goes; its lease pins its objects until then")
    p.add_argument("--force", action="store_true",
                   help="even if another mount namespace (a container) still shows it: detach it here "
                        "and keep its lease until that is gone")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser("mounts", parents=[common], help="list mounts (leases) of the primary store",
                       description="List the leases of the primary store, oldest first; STATE is `live`, "
                                   "or `stale` with the reason (the rule gc and fsck use); "
                                   "`flatmount cleanup` removes stale ones.")
    p.set_defaults(func=cmd_mounts)

    p = sub.add_parser("cleanup", parents=[common],
                       help="drop stale leases and leftover mount dirs (after crashes or reboots)",
                       description="Remove stale leases, leftover empty mount dirs, and mounts under the "
                                   "runtime dir that no lease names.  A live mount is never unmounted.")
    p.set_defaults(func=cmd_cleanup)


def cmd_mount(args: argparse.Namespace) -> int:
    from flatmount.cli import open_store, print_json, want_json
    from flatmount.mount import mount_image_ref

    lease = mount_image_ref(open_store(args), args.image)
    if want_json(args):
        print_json(lease)
    else:
        print(lease.merged)
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from flatmount.cli import open_store, print_json, want_json
    from flatmount.mount import umount

    lease = umount(open_store(args), args.target, lazy=args.lazy, force=args.force)
    if want_json(args):
        print_json(lease)
    return 0


def cmd_mounts(args: argparse.Namespace) -> int:
    from flatmount.cli import open_store, print_json, print_table, want_json
    from flatmount.mount import list_mounts

    leases = list_mounts(open_store(args))
    if want_json(args):
        print_json(leases)
        return 0
    import time

    print_table([(m.id, (m.image_ref or "")[:40], m.image_digest[:12], m.pid or "",
                  time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.created or 0)),
                  ("live" if not m.detached_sb else "live (detached, in use)") if m.live
                  else f"stale ({m.stale_reason})", m.merged)
                 for m in leases], ("LEASE", "IMAGE", "DIGEST", "PID", "CREATED", "STATE", "MERGED"))
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from flatmount.cli import open_store, print_json, to_jsonable, want_json
    from flatmount.mount import cleanup
    from flatmount.run.container import cleanup_containers

    store = open_store(args)
    containers = cleanup_containers(store)   # first: their mounts are leased until they are gone
    res = cleanup(store)
    if want_json(args):
        print_json({**to_jsonable(res), "removed_containers": containers})
        return 0
    if containers:
        print(f"removed {len(containers)} finished or orphaned containers: {' '.join(containers)}")
    print(f"removed {len(res.removed_leases)} stale leases, {len(res.removed_dirs)} dirs, "
          f"unmounted {len(res.unmounted)} unleased mounts; {len(res.kept)} mounts kept, "
          f"{len(res.busy)} busy")
    return 0


def cmd_flatten(args: argparse.Namespace) -> int:
    from flatmount.cli import open_store, print_json, want_json
    from flatmount.flatten import flatten_image

    flat = flatten_image(open_store(args), args.image)
    if want_json(args):
        print_json(flat)
    else:
        print(f"{flat.digest} {flat.path}")
    return 0
