#!/usr/bin/env python3
"""Recompute the byte pins of tests/pins.json from their trees, so that a deliberate change of the
image format is one command, and a pin is never edited by hand.

    python3 tools/regen_pins.py            # rewrite flatmount's own pins; exit 1 if a composefs pin breaks
    python3 tools/regen_pins.py --check    # only compare: print what differs, exit 1 if anything does

Each pin is the sha256 of `flatmount.image.writer.image_bytes` of a tree of tests/pin_trees.py (the
cs9 ones are read from the shared data directory: $FLATMOUNT_DATA or ../shared/data).  The tests
(tests/test_erofs.py) compare the writer's output with the pins in the file, as the safety net they
are; this tool only writes them.  The "composefs" pins are the digests composefs publishes for the
same trees: a writer that no longer matches them is wrong, so they are reported, never rewritten.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests import pin_trees  # noqa: E402


def compute(name: str, data_dir: Path) -> str:
    """The sha256 (hex) of the image of pin `name`'s tree."""
    from flatmount.image.writer import image_bytes

    return hashlib.sha256(image_bytes(pin_trees.build(name, data_dir))).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare only, write nothing")
    ap.add_argument("--pins", type=Path, default=pin_trees.PINS_FILE, help="the pin file (default: %(default)s)")
    ap.add_argument("--data", type=Path, default=pin_trees.DATA_DIR, help="shared data directory with the cs9 dumps")
    ap.add_argument("names", nargs="*", help="only these pins (default: all)")
    args = ap.parse_args(argv)

    with open(args.pins) as f:
        doc = json.load(f)
    known = {name: kind for kind in ("composefs", "flatmount") for name in doc[kind]}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        ap.error(f"no such pin: {', '.join(unknown)} (pins: {', '.join(sorted(known))})")
    missing = [n for n in (args.names or known) if n in pin_trees.DUMPS and not (args.data / n).is_file()]
    if missing:
        print(f"regen_pins: {', '.join(missing)} missing in {args.data} (set $FLATMOUNT_DATA or --data)",
              file=sys.stderr)
        return 2

    changed = broken = 0
    for name in sorted(args.names or known):
        kind = known[name]
        old = doc[kind][name]
        new = compute(name, args.data)
        if new == old:
            print(f"same      {kind:9} {name}")
            continue
        if kind == "composefs":
            broken += 1
            print(f"BROKEN    {kind:9} {name}: composefs publishes {old}, the writer now gives {new}")
            continue
        changed += 1
        print(f"{'differs' if args.check else 'rewritten':9} {kind:9} {name}: {old} -> {new}")
        doc[kind][name] = new
    if changed and not args.check:
        tmp = args.pins.with_name(args.pins.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, args.pins)
    return 1 if broken or (args.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
