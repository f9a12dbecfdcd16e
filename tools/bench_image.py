#!/usr/bin/env python3
"""Benchmark of `flatmount mkimage --from-dump` (composefs dump -> EROFS image) and `flatmount dump`
(EROFS image -> dump), end to end, next to their floors and peers measured in the same run.

Targets (issue 17 item 3): `mkimage --from-dump cs9-x86_64-developer.dump.gz OUT` (64,246 inodes)
under 0.45 s wall time including interpreter start, and at most 1.0x `mkcomposefs --from-file` of the
same dump; `dump` at most 1.5x `composefs-info dump` of the same image.  The peers are measured only
when they are on PATH (they read plain dumps only: the peer ratio compares both tools on the
decompressed dump, the gzip figure is reported beside it); the floor (`python -c pass`) always.  Runs
of flatmount and its peer alternate (paired, medians), each a child process (peak RSS from VmHWM),
plus in-process parse-only and write-only times and bytes per inode.

    python tools/bench_image.py [--quick]
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"          # the shared corpus sits next to the repository
TARGET_S = 0.45           # mkimage --from-dump of the developer dump, wall incl. interpreter start
PEER_RATIO = 1.0          # mkimage / mkcomposefs --from-file
DUMP_PEER_RATIO = 1.5     # dump / composefs-info dump


# Run the CLI as `python -m flatmount` would, then report the process's own peak RSS (VmHWM): ru_maxrss
# of a child is useless here, Linux carries the (large) parent's peak over fork and exec into it.
# (At exit: the CLI ends the process itself (flatmount.cli.run), after the atexit callbacks.)
_PEAK = ("import atexit, runpy, sys\n"
         "def peak():\n"
         "    hwm = next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
         "    sys.stderr.write(f'\\nVmHWM_KB={hwm}\\n')\n"
         "atexit.register(peak)\n"
         "sys.argv = ['flatmount', *sys.argv[1:]]\n"
         "runpy.run_module('flatmount', run_name='__main__', alter_sys=True)\n")


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


def _paired(ours: list[str], peer: list[str] | None, runs: int) -> dict:
    """Alternating runs of `ours` and `peer` (a command on PATH, or None): medians, best, and the
    median of the per-pair ratios (both saw the same machine within a pair)."""
    mine, theirs, rss = [], [], []
    for _ in range(runs):
        wall, maxrss = _timed_child(ours)
        mine.append(wall)
        rss.append(maxrss)
        if peer is not None:
            theirs.append(_timed_child(peer)[0])
    out = {"best_s": round(min(mine), 3), "median_s": round(statistics.median(mine), 3),
           "runs_s": [round(w, 3) for w in mine], "peak_rss_mib": round(max(rss) / 1024, 1)}
    if peer is not None:
        out.update(peer=os.path.basename(peer[0]), peer_median_s=round(statistics.median(theirs), 3),
                   peer_best_s=round(min(theirs), 3),
                   ratio_median_paired=round(statistics.median(a / b for a, b in zip(mine, theirs, strict=True)), 3))
    return out


def _best(fn, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


class _Null:
    """A sink for `write_dump` (the text's cost without the I/O)."""

    def write(self, b: bytes) -> int:
        return len(b)


def run(quick: bool) -> dict:
    sys.path.insert(0, str(REPO))
    from flatmount.image.dump import parse_dump, write_dump
    from flatmount.image.reader import read_tree
    from flatmount.image.tree import count_inodes
    from flatmount.image.writer import image_bytes

    dump = DATA / ("cs9-x86_64-minimal.dump.gz" if quick else "cs9-x86_64-developer.dump.gz")
    if not dump.exists():
        raise FileNotFoundError(f"{dump} is missing (expected the shared data next to the repository)")
    runs = 1 if quick else 7
    py = sys.executable
    mkcomposefs = shutil.which("mkcomposefs")
    composefs_info = shutil.which("composefs-info")

    startup = [_timed_child([py, "-c", "pass"])[0] for _ in range(runs)]
    with tempfile.TemporaryDirectory(prefix="bench-image-") as tmp:
        out = os.path.join(tmp, "out.erofs")
        plain = os.path.join(tmp, "plain.dump")
        with gzip.open(dump, "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst)
        walls, rss = [], []
        for _ in range(runs):
            wall, maxrss = _timed_child([py, "-m", "flatmount", "mkimage", "--from-dump", str(dump), out])
            walls.append(wall)
            rss.append(maxrss)
        image_size = os.path.getsize(out)
        peer_out = os.path.join(tmp, "peer.erofs")
        from_plain = _paired([py, "-m", "flatmount", "mkimage", "--from-dump", plain, out],
                             [mkcomposefs, "--from-file", plain, peer_out] if mkcomposefs else None, runs)
        if mkcomposefs:
            with open(out, "rb") as a, open(peer_out, "rb") as b:
                from_plain["same_bytes_as_peer"] = a.read() == b.read()
        # the compiled fast paths (flatmount/image/_cwrite.c) against the pure-Python code they stand
        # in for (FLATMOUNT_PURE=1), alternating in the same run
        pure_out = os.path.join(tmp, "pure.erofs")
        vs_pure = _paired([py, "-m", "flatmount", "mkimage", "--from-dump", plain, out],
                          ["env", "FLATMOUNT_PURE=1", py, "-m", "flatmount", "mkimage", "--from-dump", plain,
                           pure_out], runs)
        with open(out, "rb") as a, open(pure_out, "rb") as b:
            vs_pure["same_bytes_as_peer"] = a.read() == b.read()
        dumped = _paired([py, "-m", "flatmount", "dump", out],
                         [composefs_info, "dump", out] if composefs_info else None, runs)

    root = parse_dump(dump)
    inodes = count_inodes(root)
    parse_s = _best(lambda: parse_dump(dump), runs)
    write_s = _best(lambda: image_bytes(root), runs)
    # where `dump` spends its time: the whole-tree read of the image, then the text
    with tempfile.NamedTemporaryFile(prefix="bench-image-", suffix=".erofs") as image:
        image.write(image_bytes(root))
        image.flush()
        read_s = _best(lambda: read_tree(image.name), runs)
    text_s = _best(lambda: write_dump(root, _Null()), runs)
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
        "mkimage_plain_dump": {**from_plain, "target_peer_ratio": PEER_RATIO,
                               "meets_peer_target": (from_plain["ratio_median_paired"] <= PEER_RATIO
                                                     if mkcomposefs and not quick else None)},
        "mkimage_vs_pure_python": vs_pure,
        "dump_command": {**dumped, "python_startup_best_s": round(min(startup), 3),
                         "read_tree_best_s": round(read_s, 3), "write_dump_best_s": round(text_s, 3),
                 "target_peer_ratio": DUMP_PEER_RATIO,
                 "meets_peer_target": (dumped["ratio_median_paired"] <= DUMP_PEER_RATIO
                                       if composefs_info and not quick else None)},
    }


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv[1:]), indent=2, sort_keys=True))
