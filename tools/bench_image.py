#!/usr/bin/env python3
"""Benchmark of `flatmount mkimage --from-dump`: composefs dump (gzip) -> EROFS image, end to end.

The target: `python -m flatmount mkimage --from-dump cs9-x86_64-developer.dump.gz OUT` (64,246 inodes)
takes < 1.0 s wall time including interpreter start.  Measured as a child process (best and median of
runs, with its peak RSS from wait4), next to the machine's own baseline in the same run (bare
`python -c pass` start-up), plus in-process parse-only and write-only times and bytes per inode.

    python tools/bench_image.py [--quick]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"          # the shared corpus sits next to the repository
TARGET_S = 1.0


# Run the CLI as `python -m flatmount` would, then report the process's own peak RSS (VmHWM): ru_maxrss
# of a child is useless here, Linux carries the (large) parent's peak over fork and exec into it.
_PEAK = ("import runpy, sys\n"
         "sys.argv = ['flatmount', *sys.argv[1:]]\n"
         "try:\n    runpy.run_module('flatmount', run_name='__main__', alter_sys=True)\n"
         "finally:\n"
         "    hwm = next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
         "    sys.stderr.write(f'\\nVmHWM_KB={hwm}\\n')\n")


def _timed_child(argv: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS in KiB; 0 unless it is `python -m flatmount`) of a child that must succeed."""
    flatmount_cli = argv[1:3] == ["-m", "flatmount"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.perf_counter()
    p = subprocess.run([argv[0], "-c", _PEAK, *argv[3:]] if flatmount_cli else argv, cwd=REPO, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t
    err = p.stderr.decode(errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}: {err.strip()}")
    return wall, int(err.rpartition("VmHWM_KB=")[2].split()[0]) if flatmount_cli else 0


def _best(fn, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def run(quick: bool) -> dict:
    sys.path.insert(0, str(REPO))
    from flatmount.dump import parse_dump
    from flatmount.erofs.writer import image_bytes
    from flatmount.tree import count_inodes

    dump = DATA / ("cs9-x86_64-minimal.dump.gz" if quick else "cs9-x86_64-developer.dump.gz")
    if not dump.exists():
        raise FileNotFoundError(f"{dump} is missing (expected the shared data next to the repository)")
    runs = 1 if quick else 3
    py = sys.executable

    startup = [_timed_child([py, "-c", "pass"])[0] for _ in range(runs)]
    with tempfile.TemporaryDirectory(prefix="bench-image-") as tmp:
        out = os.path.join(tmp, "out.erofs")
        walls, rss = [], []
        for _ in range(runs):
            wall, maxrss = _timed_child([py, "-m", "flatmount", "mkimage", "--from-dump", str(dump), out])
            walls.append(wall)
            rss.append(maxrss)
        image_size = os.path.getsize(out)

    root = parse_dump(dump)
    inodes = count_inodes(root)
    parse_s = _best(lambda: parse_dump(dump), runs)
    write_s = _best(lambda: image_bytes(root), runs)
    best = min(walls)
    return {
        "dump": dump.name,
        "inodes": inodes,
        "mkimage_best_s": round(best, 3),
        "mkimage_median_s": round(statistics.median(walls), 3),
        "mkimage_runs_s": [round(w, 3) for w in walls],
        "python_startup_best_s": round(min(startup), 3),
        "mkimage_minus_startup_s": round(best - min(startup), 3),
        "peak_rss_mib": round(max(rss) / 1024, 1),
        "parse_best_s": round(parse_s, 3),
        "parse_us_per_line": round(parse_s / inodes * 1e6, 2),
        "write_best_s": round(write_s, 3),
        "image_bytes": image_size,
        "bytes_per_inode": round(image_size / inodes, 1),
        "target_s": TARGET_S,
        "meets_target": best < TARGET_S if not quick else None,
    }


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv[1:]), indent=2, sort_keys=True))
