"""`flatmount` maintenance commands: `gc`, `fsck`, `objects` (usage reports).

Exit codes (besides the CLI's 2 for usage errors and 3 for a FlatmountError):
- `gc`: 0, or 3 when some file could not be removed (listed on stderr).
- `fsck`: 0 when no error remains (notices do not count), 1 when errors remain after any repair,
  like fsck tools; `--json` does not change that.
- `objects`: 0.
Checks and reports open the store read-only; only `gc` (not `--dry-run`) and `fsck --repair` write.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add this area's subcommands to the `flatmount` parser."""
    p = sub.add_parser(
        "gc", parents=[common], help="remove unneeded flattened images and unreferenced objects",
        description="Remove flattened images no image record or live mount needs, then every object of "
                    "the primary store that no layer or kept flattened image references.  Additional "
                    "stores are never touched.  Objects younger than the grace period are kept (a writer "
                    "may not have recorded them yet).")
    p.add_argument("--dry-run", action="store_true", help="report what would be removed, remove nothing")
    p.add_argument("--grace", type=float, default=None, metavar="SECONDS",
                   help="keep unreferenced objects changed within this many seconds (default 600)")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser(
        "fsck", parents=[common], help="check store consistency (objects, refs, images, leases)",
        description="Verify object digests, find objects missing for any layer or flattened image, refs "
                    "that disagree with image contents, missing or corrupt image files, stale leases, "
                    "orphans and temp leftovers.  Exit status 1 when errors remain.")
    p.add_argument("--repair", action="store_true",
                   help="fix what needs no lost data (rebuild refs, drop stale leases and rows of missing "
                        "images, quarantine corrupt objects, remove temp leftovers)")
    p.add_argument("--sample", type=_sample, default=None, metavar="N|P%",
                   help="verify the digests of N random objects, or P percent of them (default: all)")
    p.set_defaults(func=cmd_fsck)

    p = sub.add_parser(
        "objects", parents=[common], help="object usage reports (default: usage)",
        description="Where the bytes of the store go.  Reports: usage (store totals), images (per image: "
                    "total, unique = freed by removing it, shared), refs DIGEST (who uses an object), "
                    "top (largest and most-shared objects), share (bytes shared by each pair of images).")
    p.set_defaults(func=cmd_objects, report="usage")
    reports = p.add_subparsers(dest="report", metavar="REPORT")
    reports.required = False
    reports.add_parser("usage", parents=[common], help="store totals and dedup ratio",
                       description="Object report: store totals and dedup ratio.")
    reports.add_parser("images", parents=[common], help="per image: total, unique and shared bytes",
                       description="Object report: per image: total, unique and shared bytes.")
    r = reports.add_parser("refs", parents=[common], help="which layers, images and mounts use an object",
                       description="Object report: which layers, images and mounts use an object.")
    r.add_argument("digest", metavar="DIGEST", type=_object,
                   help="64 hex digits, or an object path XX/<62 hex>")
    r = reports.add_parser("top", parents=[common], help="largest and most-shared objects",
                       description="Object report: largest and most-shared objects.")
    r.add_argument("-n", type=int, default=10, metavar="N", help="how many of each (default 10)")
    reports.add_parser("share", parents=[common], help="bytes shared between each pair of images",
                       description="Object report: bytes shared between each pair of images.")


def _object(text: str) -> str:
    """An object's `XX/<62 hex>` from a digest or path; anything else is a usage error (exit 2)."""
    from flatmount.errors import FlatmountError
    from flatmount.usage import parse_object

    try:
        return parse_object(text)
    except FlatmountError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _sample(text: str) -> float | int:
    try:
        if text.endswith("%"):
            p = float(text[:-1])
            if not 0 < p <= 100:
                raise ValueError
            return p / 100
        n = int(text)
        if n < 0:
            raise ValueError
        return n
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (N) or a percentage (P%)") from None


def human(n: int | float) -> str:
    """Bytes as `du -h` would say them, with one decimal."""
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


# --- gc --------------------------------------------------------------------------------------------

def cmd_gc(args: argparse.Namespace) -> int:
    from flatmount.cli import open_store, print_json, progress, want_json
    from flatmount.gc import DEFAULT_GRACE_S, gc

    grace = DEFAULT_GRACE_S if args.grace is None else args.grace
    with progress(args), open_store(args, readonly=args.dry_run) as store:
        res = gc(store, dry_run=args.dry_run, grace_s=grace)
    if want_json(args):
        print_json(res)
    else:
        verb = "would remove" if res.dry_run else "removed"
        print(f"{verb} {res.objects_removed} objects ({human(res.object_bytes_freed)}), "
              f"{len(res.images_removed)} flattened images, {len(res.layer_files_removed)} orphan layer "
              f"files: {human(res.bytes_freed)} in all")
        print(f"kept {res.objects_kept} referenced objects, {res.images_kept} flattened images "
              f"({res.leases_live} live mounts)")
        if res.objects_kept_recent:
            print(f"kept {res.objects_kept_recent} unreferenced objects ({human(res.bytes_kept_recent)}) "
                  f"changed in the last {res.grace_s:g} s (--grace)")
        if res.objects_kept_additional:
            print(f"kept {res.objects_kept_additional} unreferenced objects an additional store needs")
        if res.leases_stale:
            print(f"{res.leases_stale} stale leases ignored (flatmount cleanup removes them)")
        if res.layers_unused:
            print(f"{len(res.layers_unused)} layers are used by no image (rmi removes layers with their "
                  "last image)")
    for e in res.errors:
        print(f"flatmount: gc: {e}", file=sys.stderr)
    return 3 if res.errors else 0


# --- fsck ------------------------------------------------------------------------------------------

NOTICE_LINES = 5   # per kind, in the human output


def cmd_fsck(args: argparse.Namespace) -> int:
    from flatmount.cli import open_store, print_json, progress, want_json
    from flatmount.fsck import ERROR, fsck

    with progress(args), open_store(args, readonly=not args.repair) as store:
        res = fsck(store, repair=args.repair, sample=args.sample)
    if want_json(args):
        print_json(res)
        return 0 if res.ok else 1
    shown: dict[str, int] = {}
    for p in res.problems:
        if p.severity != ERROR:
            shown[p.kind] = shown.get(p.kind, 0) + 1
            if shown[p.kind] > NOTICE_LINES:
                continue
        state = "repaired" if p.repaired else p.severity
        line = f"{state:8}  {p.kind:20}  {p.subject}  {p.detail}"
        if p.note:
            line += f"  [{p.note}]"
        print(line)
    for kind, n in sorted(shown.items()):
        if n > NOTICE_LINES:
            print(f"{'notice':8}  {kind:20}  ... and {n - NOTICE_LINES} more")
    errors = sum(1 for p in res.problems if p.severity == ERROR)
    repaired = sum(1 for p in res.problems if p.severity == ERROR and p.repaired)
    notices = sum(1 for p in res.problems if p.severity != ERROR)
    print(f"{res.objects_verified} of {res.objects} objects verified, {res.layers} layers, {res.flat_images} "
          f"flattened images, {res.leases} leases: {errors} errors ({repaired} repaired), {notices} notices"
          f" in {res.seconds:.1f} s")
    if not res.ok:
        print("fsck: errors remain" + ("" if args.repair else " (fsck --repair fixes those marked so)"))
    return 0 if res.ok else 1


# --- objects ---------------------------------------------------------------------------------------

def cmd_objects(args: argparse.Namespace) -> int:
    from flatmount import usage as u
    from flatmount.cli import open_store, print_json, print_table, progress, want_json

    report = args.report or "usage"
    with progress(args), open_store(args, readonly=True) as store:
        if report in ("usage", "images"):
            res = u.usage(store)
        elif report == "refs":
            res = u.object_refs(store, args.digest)
        elif report == "top":
            res = u.top(store, args.n)
        else:
            res = u.share(store)
    if want_json(args):
        print_json(res.images if report == "images" else res)
        return 0
    if report == "usage":
        rows = [
            ("objects (primary)", f"{res.objects}", human(res.stored_bytes)),
            ("referenced by images", f"{res.referenced_objects}", human(res.referenced_bytes)),
            ("  of which in additional stores", f"{res.additional_objects}", human(res.additional_bytes)),
            ("logical (per image)", "", human(res.logical_bytes)),
            ("unreferenced (gc)", f"{res.unreferenced_objects}", human(res.unreferenced_bytes)),
            ("missing", f"{res.missing_objects}", ""),
        ]
        print_table(rows, ("", "OBJECTS", "BYTES"))
        print(f"dedup ratio {res.dedup_ratio:.2f} over {res.image_count} images, {res.layer_count} layers")
    elif report == "images":
        rows = [(i.label, i.id[:12], i.layers, i.objects, human(i.total_bytes), human(i.unique_bytes),
                 human(i.shared_bytes), human(i.additional_bytes), i.missing_objects or "")
                for i in sorted(res.images, key=lambda i: (-i.total_bytes, i.label))]
        print_table(rows, ("IMAGE", "ID", "LAYERS", "OBJECTS", "TOTAL", "UNIQUE", "SHARED", "IN-ADDITIONAL",
                           "MISSING"))
    elif report == "refs":
        print(f"object {res.object}: " + (human(res.size) if res.size is not None else "in no store"))
        for loc in res.locations:
            print(f"  at {loc}")
        if res.users:
            print_table([(x.kind, x.id, x.detail, x.store_root) for x in res.users],
                        ("USER", "ID", "DETAIL", "STORE"))
        else:
            print("referenced by nothing (gc removes it)")
    elif report == "top":
        for title, items in (("largest", res.largest), ("most shared", res.most_shared)):
            print(f"{title}:")
            print_table([(t.object, human(t.size), t.images, t.location, ", ".join(t.image_labels[:4])
                          + (" ..." if len(t.image_labels) > 4 else "")) for t in items],
                        ("OBJECT", "SIZE", "IMAGES", "WHERE", "USED BY"))
    else:
        print_table([(p.a, p.b, p.objects, human(p.bytes)) for p in res.pairs],
                    ("IMAGE", "IMAGE", "SHARED OBJECTS", "SHARED BYTES"))
    return 0
