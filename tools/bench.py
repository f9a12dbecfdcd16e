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
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


# areas that delete a lot run last: on a file system mounted with `discard`, the trimming that follows
# their deletes slows every write for a while (the gc area removes 200,000 objects)
FIRST = ("import",)   # its small-files figure must not follow other areas' mass deletes (see bench_import)
LAST = ("objects", "gc")


def areas() -> list[str]:
    names = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    middle = [a for a in names if a not in FIRST + LAST]
    return [a for a in FIRST if a in names] + middle + [a for a in LAST if a in names]


def precompile() -> None:
    """Byte-compile the package as an installation would (pip writes .pyc files at install time): with
    an editable install under PYTHONDONTWRITEBYTECODE, every fresh process would otherwise compile the
    modules it imports, which the start-up figures (CLI, import) should not include."""
    import compileall

    for pkg in ("flatmount", "objects"):
        compileall.compile_dir(str(HERE.parent / pkg), quiet=1)


def disk_idle(path: str = tempfile.gettempdir(), quiet_s: float = 0.5, max_s: float = 60.0) -> float:
    """Wait until the block device holding `path` has done no I/O for `quiet_s` (io_ticks of
    /sys/dev/block/M:N/stat unchanged), at most `max_s`; returns the seconds waited.  A sync alone
    does not wait for the discards a file system mounted with `discard` sends after a big delete."""
    st = os.stat(path)
    stat_file = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat"
    t0 = time.monotonic()
    try:
        def ticks() -> tuple[str, str]:
            with open(stat_file) as f:
                fields = f.read().split()
            return fields[8], fields[9]   # in flight, io_ticks
        last = ticks()
        quiet_since = time.monotonic()
        while time.monotonic() - t0 < max_s:
            time.sleep(0.05)
            now = ticks()
            if now != last or now[0] != "0":
                last, quiet_since = now, time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                break
    except OSError:   # no such device file (e.g. a file system without one): a plain pause
        time.sleep(quiet_s)
    return time.monotonic() - t0


def settle() -> None:
    """Start each area on a quiet machine: what the previous one wrote and deleted flushed, the
    disk idle again, and the previous area's garbage collected."""
    import gc

    os.sync()
    gc.collect()
    disk_idle()
    os.sync()


def machine_state() -> dict:
    """How fast this machine is right now, by three plain yardsticks (these VMs drift by a third
    within an hour): interpreter start-up, first touch of fresh memory, and 1-core sha256.  Taken
    before and after the areas, so every figure can be read against the machine it ran on."""
    import subprocess

    from bench_objects import bench_sha256

    starts = []
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        starts.append(time.perf_counter() - t0)
    size = 256 << 20
    t0 = time.perf_counter()
    buf = bytearray(size)
    for i in range(0, size, 4096):
        buf[i] = 1
    touch = time.perf_counter() - t0
    del buf
    return {"python_startup_ms": round(min(starts) * 1000, 1),
            "first_touch_us_per_page": round(touch / (size // 4096) * 1e6, 2),
            "sha256_1core_mb_s": round(bench_sha256(256))}


def _get(results: dict, *path: str):
    """results["areas"][path...], or None where an area did not run or did not report it."""
    x = results["areas"]
    for key in path:
        if not isinstance(x, dict) or key not in x:
            return None
        x = x[key]
    return x


def _target(figure, limit, *, at_most: bool = True, **baseline) -> dict:
    met = None if figure is None else (figure <= limit if at_most else figure >= limit)
    return {"figure": figure, "target": ("<= " if at_most else ">= ") + str(limit), "met": met, **baseline}


def targets(results: dict) -> dict:
    """The speed targets of issue 17, each figure next to its baseline from the same run (None where
    its area did not run): the summary a closing note quotes."""
    g = lambda *p: _get(results, *p)  # noqa: E731
    cli = g("mount", "cli") or {}
    instr = cli.get("instructions_millions") or {}
    return {
        "1_small_files_vs_tar_x_sync": _target(
            g("import", "small_vs_floor_median"), 0.9, files_per_s=g("import", "small_files_per_s_median"),
            floor_files_per_s=g("import", "small_floor_files_per_s_median")),
        "1_small_files_rss_mb": _target(g("import", "small_rss_with_helpers_peak_mb"), 150),
        "2_big_import_vs_min_sha256_disk": _target(
            g("import", "big_import_vs_ceiling_median"), 0.8, at_most=False,
            mb_per_s=g("import", "big_import_mb_per_s_median"), write_mode=g("import", "write_mode")),
        "2_medium_vs_big": _target(g("import", "medium_vs_big_median"), 0.95, at_most=False),
        "3_mkimage_vs_mkcomposefs": _target(
            g("image", "mkimage_plain_dump", "ratio_median_paired"), 1.0,
            seconds=g("image", "mkimage_plain_dump", "median_s"),
            mkcomposefs_s=g("image", "mkimage_plain_dump", "peer_median_s")),
        "3_mkimage_gz_dump_wall_s": _target(g("image", "mkimage_best_s"), 0.45),
        "3_dump_vs_composefs_info": _target(
            g("image", "dump_command", "ratio_median_paired"), 1.5,
            seconds=g("image", "dump_command", "median_s"),
            composefs_info_s=g("image", "dump_command", "peer_median_s")),
        "4_flatten_top_layer_new_process_s": _target(
            g("flatten", "flatten", "store_top_layer_only", "store_flatten_top_layer_new_process_s"), 0.15,
            median_s=g("flatten", "flatten", "store_top_layer_only",
                       "store_flatten_top_layer_new_process_median_s")),
        "5_cli_mount_over_python_ms": _target(
            (cli.get("python -m flatmount: mount") or {}).get("over_floor_ms"), 15,
            instructions_est_ms=instr.get("mount_over_floor_ms_est"),
            python_c_pass_p50_ms=(cli.get("python_c_pass") or {}).get("p50_ms"),
            without_site_ms=(cli.get("python -S -m flatmount: mount") or {}).get("over_floor_ms")),
        "5_cli_umount_over_python_ms": _target(
            (cli.get("python -m flatmount: umount") or {}).get("over_floor_ms"), 15,
            instructions_est_ms=instr.get("umount_over_floor_ms_est"),
            without_site_ms=(cli.get("python -S -m flatmount: umount") or {}).get("over_floor_ms")),
    }


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
    results["machine"]["state_before"] = machine_state()
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
    results["machine"]["state_after"] = machine_state()
    results["targets"] = targets(results)
    print(json.dumps(results["targets"], indent=2), file=sys.stderr)
    Path(args.output).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"results written to {args.output}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
