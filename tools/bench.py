#!/usr/bin/env python3
"""Benchmark harness: runs every tools/bench_<area>.py `run(quick)` and writes one JSON file.

Each area measures its own baseline in the same run (these machines are noisy), so the figures to
read are the ratios next to the absolute numbers.

    python tools/bench.py                 # all areas, full size
    python tools/bench.py --quick erofs   # one area, small inputs
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def areas() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def precompile() -> None:
    """Byte-compile the package as an installation would (pip writes .pyc files at install time): with
    an editable install under PYTHONDONTWRITEBYTECODE, every fresh process would otherwise compile the
    modules it imports, which the start-up figures (CLI, import) should not include."""
    import compileall

    for pkg in ("flatmount", "objects"):
        compileall.compile_dir(str(HERE.parent / pkg), quiet=1)


def settle() -> None:
    """Start each area on a quiet machine: what the previous one wrote and deleted flushed (on a file
    system mounted with `discard`, deleting the gc area's 200,000 objects keeps the disk busy trimming
    for a while) and its garbage collected."""
    import gc

    os.sync()
    gc.collect()
    time.sleep(1.0)
    os.sync()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("areas", nargs="*", help=f"areas to run (default: all of {', '.join(areas())})")
    ap.add_argument("--quick", action="store_true", help="small inputs (for CI smoke runs)")
    ap.add_argument("-o", "--output", default="bench-results.json", help="JSON results file")
    args = ap.parse_args(argv)
    chosen = args.areas or areas()
    unknown = set(chosen) - set(areas())
    if unknown:
        ap.error(f"unknown areas: {', '.join(sorted(unknown))}")
    results: dict = {
        "machine": {"kernel": platform.release(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "quick": args.quick,
        "areas": {},
    }
    precompile()
    failed = False
    for area in chosen:
        print(f"== {area}", file=sys.stderr, flush=True)
        settle()
        t0 = time.perf_counter()
        try:
            res = importlib.import_module(f"bench_{area}").run(args.quick)
        except Exception:  # a failing area is reported and makes the run fail, others still run
            traceback.print_exc()
            res = {"error": traceback.format_exc(limit=3)}
            failed = True
        res["_seconds"] = round(time.perf_counter() - t0, 2)
        results["areas"][area] = res
        print(json.dumps(res, indent=2, sort_keys=True), file=sys.stderr, flush=True)
    Path(args.output).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"results written to {args.output}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
