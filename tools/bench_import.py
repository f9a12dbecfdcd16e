#!/usr/bin/env python3
"""Benchmark: layer import (`pull tar:`) throughput and memory, next to same-run baselines.

- big: an uncompressed tar of large files (500 MB; quick: 64 MB) pulled into a fresh store, durable
  at the end (objects synced, DB committed): MB/s of tar, next to single-core hashlib sha256 MB/s
  (the import hashes every byte twice: sha256 for the diff_id, fs-verity sha256 for the object) and
  the disk's sequential write+fsync MB/s (every byte is written once);
- medium: the same number of bytes in files of 5 MB (100; quick: 12): what starting and finishing
  each file's put costs, as MB/s and against the big files;
- CPU seconds of each big and medium pull (all its threads), and the share of them the two hashes
  of every byte take at sha256's rate per CPU second (`*_hashing_share_of_cpu`; 1.0 would be
  nothing but hashing): on a machine others load, MB/s fall with the cores we get, this share
  hardly moves;
- small: a tar of 50,000 small files (quick: 10,000; 1 .. 8 KB): files/s, next to its floor measured
  in the same run, interleaved: `tar -x` of the same tar into a fresh directory, then `sync -f` (one
  thread writing the same files, no hashing); the target is at most 0.9x its time (median of the
  paired ratios), with peak RSS (the pull's own plus its largest helper's) under 150 MB.  As root,
  each floor and each pull runs on a file system of its own, made for it (tools/freshfs.py: the
  same type, features and mount options as the work dir's, loop-mounted); `fs` in the JSON says
  what was used;
- peak RSS of each pull, measured in a child process (ru_maxrss), with the RSS of the same child
  before the pull (current RSS, /proc/self/status VmRSS), so the figure that should stay flat as
  layers grow is `big_rss_growth_mb` (the small-files layer grows with the number of entries: the
  tree and the EROFS image are built in memory); the pull's own helper processes (objects.bulk,
  which create small objects' files) are reported apart, the largest one's peak.

The tar files are freshly written and flushed to disk before each pull (so their writeback does not
compete with the import's writes), and read from the page cache: the figures are for the import
pipeline, not for reading the source.

    python3 tools/bench_import.py [--quick]      # prints JSON
    python3 tools/bench_import.py --small-only [--rounds N] [--old TREE] [--same-fs]
        # only the small files; with --old, a second checkout's pull (e.g. `git archive HEAD | tar -x
        # -C TREE`) joins the same interleaving (floor, old, new per round), for A/B figures
    python3 tools/bench_import.py --big-only [--rounds N] [--old TREE]
        # only the big and medium files, each round: the two ceilings, then (with --old) old and new
        # pulls of both tars in alternating order; medians of paired ratios, CPU seconds
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench_objects import bench_disk_write, bench_sha256

ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000
MEDIUM_FILE = 5 * MB  # the medium-files layer: as many bytes as the big one, in files of 5 MB

CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
from flatmount.pull import pull
from flatmount.api import open_store
store_dir, source = sys.argv[1:3]
s = open_store(store_dir, runroot=store_dir + "-run", config=os.devnull, additional=[])
write_mode, probe_s = "direct", 0.0
try:  # the write-mode probe (objects.writemode) runs once per boot and store: at open, not timed here
    from objects import writemode
    tp = time.perf_counter()
    write_mode = "direct" if writemode.use_direct(s.objects._dirfd) else "buffered"
    probe_s = time.perf_counter() - tp
except ImportError:  # (the code before it: always O_DIRECT)
    pass
def rss_now_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
rss0 = rss_now_kb()
ru0 = resource.getrusage(resource.RUSAGE_SELF)
t0 = time.perf_counter()
r = pull(s, "tar:" + source)
dt = time.perf_counter() - t0
ru1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime  # all threads (helpers are processes: none here)
with open("/proc/self/status") as f:  # VmHWM, not ru_maxrss: that one carries the parent's over exec
    rss1 = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
rss_helpers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # largest helper process, if any
import objects.bulk as bulk  # how many helpers it starts (a checkout from before helper_count: HELPERS)
helpers = bulk.helper_count() if hasattr(bulk, "helper_count") else bulk.HELPERS
print(json.dumps({{"seconds": dt, "rss_before_kb": rss0, "rss_peak_kb": rss1, "entries": r.entries,
                  "bytes": r.bytes_read, "rss_helpers_kb": rss_helpers, "helpers": helpers, "write_mode": write_mode,
                  "probe_s": probe_s, "cpu_s": cpu}}))
"""


class _Content:
    """A file object of `size` bytes: a random 1 MiB block, each chunk stamped with a unique counter."""

    block = os.urandom(1 << 20)
    counter = 0

    def __init__(self, size: int):
        self.left = size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.left:
            n = self.left
        n = min(n, len(self.block))
        self.left -= n
        _Content.counter += 1
        stamp = _Content.counter.to_bytes(8, "little")
        return stamp + self.block[8:n] if n >= 8 else self.block[:n]


def _big_tar(path: Path, total: int, nfiles: int = 8) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(nfiles):
            ti = tarfile.TarInfo(f"data/big{i}.bin")
            ti.size = total // nfiles
            ti.mtime = 1_700_000_000
            tf.addfile(ti, _Content(ti.size))


def _small_tar(path: Path, count: int) -> None:
    rng = random.Random(42)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(count):
            size = rng.randint(1000, 8192)
            ti = tarfile.TarInfo(f"d{i // 1000:03d}/f{i:06d}")
            ti.size = size
            ti.mtime = 1_700_000_000
            tf.addfile(ti, _Content(size))


def _settle(path: Path) -> None:
    """Flush a freshly written source to disk (it stays in the page cache), so its writeback does not
    compete with the import's own writes for the disk while the import is timed."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pull_in_child(workdir: Path, tar: Path, name: str, keep: bool = False, root: Path = ROOT) -> dict:
    """Pull `tar` into a fresh store in a new process (the code of checkout `root`); the store is
    deleted after unless `keep`.  Adds the child's CPU seconds (user+sys, helpers included)."""
    import resource

    script = workdir / f"child-{abs(hash(str(root)))}.py"
    script.write_text(CHILD.format(root=str(root)))
    store = workdir / f"store-{name}"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run([sys.executable, str(script), str(store), str(tar)], capture_output=True, text=True,
                       check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = json.loads(p.stdout)
    res["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    res["vcsw"] = after.ru_nvcsw - before.ru_nvcsw  # voluntary context switches: threads waiting for each other
    if not keep:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(str(store) + "-run", ignore_errors=True)
    return res


def _rss_with_helpers_kb(pull: dict) -> int:
    """A pull's peak RSS plus its helpers', each counted at the largest one's."""
    return pull["rss_peak_kb"] + pull["helpers"] * pull["rss_helpers_kb"]


def _tar_x_floor(tar: Path, dest: Path, cpu: list[float] | None = None) -> float:
    """The small-files floor: `tar -x` into a fresh directory, then `sync -f` on it, seconds (its
    CPU seconds, user+sys, appended to `cpu`)."""
    import resource
    import time

    dest.mkdir()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(["tar", "-x", "-f", str(tar), "-C", str(dest)], check=True)
    subprocess.run(["sync", "-f", str(dest)], check=True)
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if cpu is not None:
        cpu.append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
    return dt


def _small_places(workdir: Path, same_fs: bool = False) -> tuple[dict, Callable[[str], Any]]:
    """Where each small-files measurement runs: by default a fresh file system of the same kind as
    the work dir's, one per measurement (tools/freshfs.py: a slow floor after others' big deletes
    made the ratio meaningless), else (`same_fs`, or not root, or not ext2/3/4) a new directory in
    the work dir, as before.  Returns what was used (for the JSON) and `place(name)`, a context
    manager giving the directory to measure in.

    One file system per measurement, not one per round for the floor and the pulls together: the
    second writer in a shared one would start in block groups and directories the first one
    filled, so the two would no longer start from the same state."""
    import freshfs

    desc = freshfs.describe(workdir)
    if same_fs or not desc["usable"]:
        why = "--same-fs" if same_fs else desc["why"]

        @contextlib.contextmanager
        def plain(name: str) -> Iterator[Path]:
            d = workdir / name
            d.mkdir()
            yield d

        return {"fresh_fs_per_measurement": False, "why": why, "fs": desc["original"]}, plain

    def fresh(name: str) -> Any:
        return freshfs.fresh(workdir / f"{name}.img", desc)

    return {"fresh_fs_per_measurement": True} | {k: v for k, v in desc.items() if k != "usable"}, fresh


def _small_rounds(workdir: Path, small: Path, rounds: int) -> tuple[list[float], list[dict], dict]:
    """Interleaved (floor, pull) pairs, each on a fresh file system (`_small_places`); nothing is
    deleted until all are done (on the shared file system: each one then allocates its inodes in
    the same state, see the note in `run`)."""
    floors: list[float] = []
    pulls: list[dict] = []
    used, place = _small_places(workdir)
    for i in range(rounds):
        with place(f"floor-{i}") as d:
            floors.append(_tar_x_floor(small, d / "x"))
        with place(f"small-{i}") as d:
            pulls.append(_pull_in_child(d, small, "small", keep=True))
    for p in workdir.iterdir():
        if p != small:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    return floors, pulls, used


def _sha256_cpu_rate(total_mib: int = 256) -> float:
    """hashlib sha256 MB per CPU second (thread time, not wall time: a baseline for CPU figures
    must not fall when others load the machine, as `bench_sha256`'s wall-clock rate does)."""
    import hashlib
    import time

    buf = os.urandom(1 << 20)
    h = hashlib.sha256()
    for _ in range(total_mib // 4):
        h.update(buf)
    t = time.thread_time()
    for _ in range(total_mib):
        h.update(buf)
    return total_mib * (1 << 20) / MB / (time.thread_time() - t)


def _quiet() -> None:
    """Let the file system finish a big write or delete (ext4 with `discard` trims freed blocks
    later) and wait for an idle disk, so that work does not slow the next measurement: the sha256
    baseline measured while the kernel still trims read 20-30% low, which flattered the ratio."""
    from bench import settle

    settle()


def run(quick: bool, rounds: int = 3) -> dict:
    """`rounds` rounds of (sha256 baseline, disk baseline, big pull in a fresh process): the machine
    is noisy, so each figure is given as the best and the median of its rounds, and the acceptance
    ratio compares like with like (best with best, median with median)."""
    big_size = (64 if quick else 500) * MB
    small_count = 10_000 if quick else 50_000
    rounds = 1 if quick else rounds
    small_rounds = 2 if quick else max(rounds, 5)  # (5: its median moved by 3% between runs of 3)
    workdir = Path(tempfile.mkdtemp(prefix="flatmount-bench-import-", dir=os.environ.get("BENCH_TMP")))
    sha: list[float] = []
    disk: list[float] = []
    pulls: list[dict] = []
    medium_pulls: list[dict] = []
    try:
        # the small files first, before this area deletes anything: ext4 without a journal (the root
        # file system of these VMs) passes over inodes freed in the last minute or more when it
        # allocates new ones (fs/ext4/ialloc.c, recently_deleted()), so 50,000 files created right
        # after 50,000 were deleted take twice as long (bench.py runs this area first, too)
        small = workdir / "small.tar"
        _small_tar(small, small_count)
        _settle(small)
        small_floors, small_pulls, small_fs = _small_rounds(workdir, small, small_rounds)
        small.unlink()
        _quiet()

        big = workdir / "big.tar"
        _big_tar(big, big_size)
        tar_bytes = big.stat().st_size
        # the same bytes in 100 files of 5 MB (shared libraries, binaries): each file is a put of
        # its own, so what a put costs to start and finish shows here
        medium = workdir / "medium.tar"
        _big_tar(medium, big_size, big_size // MEDIUM_FILE)
        _quiet()  # (flushes the tars too)
        for i in range(rounds):
            sha.append(bench_sha256(1024))
            # twice: on this thin-provisioned virtual disk the first big write after a delete often
            # runs at a third of the speed (the host allocating again what the trim gave back)
            disk_mib = min(big_size, 256 * MB) // MB
            disk.append(max(bench_disk_write(workdir / "disk-baseline", disk_mib) for _ in range(2)))
            (workdir / "disk-baseline").unlink()
            _quiet()
            # big and medium in the same round, in alternating order: this disk's speed drifts over
            # minutes, so rounds of all big pulls, then all medium ones, compared unlike disks
            for kind in (("big", "medium") if i % 2 == 0 else ("medium", "big")):
                done = _pull_in_child(workdir, big if kind == "big" else medium, kind)
                (pulls if kind == "big" else medium_pulls).append(done)
                _quiet()
        big.unlink()
        medium.unlink()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    imp = [tar_bytes / p["seconds"] / MB for p in pulls]
    medium_imp = [tar_bytes / p["seconds"] / MB for p in medium_pulls]
    # CPU seconds of the two hashes every byte needs (diff_id sha256, fs-verity) at the 1-core sha256
    # rate, against the pull's own: how much of its CPU is that unavoidable work.  Unlike the MB/s,
    # this hardly moves when other work shares the machine (which takes cores, not instructions).
    need_cpu = 2 * tar_bytes / MB / _sha256_cpu_rate()
    best = {"import": max(imp), "sha": max(sha), "disk": max(disk)}
    med = {"import": statistics.median(imp), "sha": statistics.median(sha), "disk": statistics.median(disk)}
    worst_rss = max(pulls, key=lambda p: p["rss_peak_kb"])
    small_s = [p["seconds"] for p in small_pulls]
    small_ratios = [p / f for p, f in zip(small_s, small_floors, strict=True)]
    s = max(small_pulls, key=_rss_with_helpers_kb)
    return {
        "rounds": rounds,
        "big_layer_mb": round(tar_bytes / MB, 1),
        "big_import_mb_per_s": [round(x, 1) for x in imp],
        "big_import_mb_per_s_best": round(best["import"], 1),
        "big_import_mb_per_s_median": round(med["import"], 1),
        "baseline_sha256_mb_per_s": [round(x, 1) for x in sha],
        "baseline_disk_write_fsync_mb_per_s": [round(x, 1) for x in disk],
        "big_import_vs_sha256_best": round(best["import"] / best["sha"], 3),
        # the acceptance figure: against the lower of the two ceilings measured in the same rounds
        "big_import_vs_ceiling_best": round(best["import"] / min(best["sha"], best["disk"]), 3),
        "big_import_vs_ceiling_median": round(med["import"] / min(med["sha"], med["disk"]), 3),
        "big_rss_peak_mb": round(worst_rss["rss_peak_kb"] / 1024, 1),
        "big_rss_growth_mb": round((worst_rss["rss_peak_kb"] - worst_rss["rss_before_kb"]) / 1024, 1),
        "write_mode": sorted({p["write_mode"] for p in pulls + medium_pulls}),  # objects.writemode's choice
        "write_mode_probe_ms": round(1000 * max(p["probe_s"] for p in pulls + medium_pulls), 1),
        "big_import_cpu_s": [round(p["cpu_s"], 3) for p in pulls],
        "big_hashing_share_of_cpu": round(need_cpu / statistics.median(p["cpu_s"] for p in pulls), 3),
        "medium_import_cpu_s": [round(p["cpu_s"], 3) for p in medium_pulls],
        "medium_hashing_share_of_cpu": round(need_cpu / statistics.median(p["cpu_s"] for p in medium_pulls), 3),
        "medium_files": big_size // MEDIUM_FILE,
        "medium_import_mb_per_s": [round(x, 1) for x in medium_imp],
        "medium_import_mb_per_s_best": round(max(medium_imp), 1),
        "medium_vs_big_best": round(max(medium_imp) / best["import"], 3),
        # the median of each round's ratio (the two pulls of a round ran seconds apart)
        "medium_vs_big_median": round(statistics.median(m / b for m, b in zip(medium_imp, imp, strict=True)), 3),
        "small_files": small_count,
        "small_rounds": small_rounds,
        "small_fs": small_fs,  # where the floor and the pulls ran (tools/freshfs.py)
        "small_files_per_s": round(small_count / min(small_s), 0),  # best round
        "small_files_per_s_median": round(small_count / statistics.median(small_s), 0),
        "small_seconds": [round(x, 2) for x in small_s],
        # the floor of the same rounds, each right before its pull: tar -x into a fresh dir + sync -f
        "small_floor_tar_x_sync_seconds": [round(x, 2) for x in small_floors],
        "small_floor_files_per_s_median": round(small_count / statistics.median(small_floors), 0),
        "small_vs_floor": [round(x, 3) for x in small_ratios],
        "small_vs_floor_median": round(statistics.median(small_ratios), 3),  # target <= 0.9
        # the pull's peak plus its helpers' (objects.bulk.helper_count()), each counted at the largest one's
        "small_rss_with_helpers_peak_mb": round(_rss_with_helpers_kb(s) / 1024, 1),  # < 150
        "small_helpers": s["helpers"],
        "small_rss_peak_mb": round(s["rss_peak_kb"] / 1024, 1),
        "small_rss_growth_mb": round((s["rss_peak_kb"] - s["rss_before_kb"]) / 1024, 1),
        "small_helper_rss_peak_mb": round(s["rss_helpers_kb"] / 1024, 1),  # objects.bulk helpers (each)
    }


def run_small(quick: bool, rounds: int = 5, old: Path | None = None, same_fs: bool = False) -> dict:
    """Only the small-files part: per round the floor, then (with `old`) the old checkout's pull, then
    this one's, each on a fresh file system (`_small_places`; `same_fs`: all in the work dir); the
    medians of the paired ratios and the CPU seconds (user+sys, which others' load on a shared
    machine changes less than wall time)."""
    count = 10_000 if quick else 50_000
    workdir = Path(tempfile.mkdtemp(prefix="flatmount-bench-small-", dir=os.environ.get("BENCH_TMP")))
    floors: list[float] = []
    floor_cpu: list[float] = []
    pulls: dict[str, list[dict]] = {"new": [], "old": []}
    try:
        small = workdir / "small.tar"
        _small_tar(small, count)
        _settle(small)
        used, place = _small_places(workdir, same_fs)
        for i in range(rounds):
            with place(f"floor-{i}") as d:
                floors.append(_tar_x_floor(small, d / "x", floor_cpu))
            if old is not None:
                with place(f"old-{i}") as d:
                    pulls["old"].append(_pull_in_child(d, small, "old", keep=True, root=old))
            with place(f"new-{i}") as d:
                pulls["new"].append(_pull_in_child(d, small, "new", keep=True))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out: dict = {"small_files": count, "rounds": rounds, "fs": used,
                 "floor_seconds": [round(x, 2) for x in floors],
                 "floor_cpu_seconds": [round(x, 2) for x in floor_cpu]}
    for which, ps in pulls.items():
        if not ps:
            continue
        secs = [p["seconds"] for p in ps]
        ratios = [p / f for p, f in zip(secs, floors, strict=True)]
        s = max(ps, key=_rss_with_helpers_kb)
        out[which] = {
            "seconds": [round(x, 2) for x in secs],
            "cpu_seconds": [round(p["cpu_s"], 2) for p in ps],
            "files_per_s_median": round(count / statistics.median(secs), 0),
            "vs_floor": [round(x, 3) for x in ratios],
            "vs_floor_median": round(statistics.median(ratios), 3),
            "cpu_vs_floor_cpu_median": round(statistics.median(
                [p["cpu_s"] / f for p, f in zip(ps, floor_cpu, strict=True)]), 3),
            "rss_with_helpers_peak_mb": round(_rss_with_helpers_kb(s) / 1024, 1),
            "rss_mb": [[round(p["rss_peak_kb"] / 1024, 1), round(p["rss_helpers_kb"] / 1024, 1)] for p in ps],
        }
    if pulls["old"]:
        out["new_vs_old_median"] = round(statistics.median(
            [n["seconds"] / o["seconds"] for n, o in zip(pulls["new"], pulls["old"], strict=True)]), 3)
        out["new_vs_old_cpu_median"] = round(statistics.median(
            [n["cpu_s"] / o["cpu_s"] for n, o in zip(pulls["new"], pulls["old"], strict=True)]), 3)
    return out


def run_big(quick: bool, rounds: int = 5, old: Path | None = None) -> dict:
    """Only the big and medium parts, `rounds` rounds of: 1-core sha256 and disk write+fsync (the
    ceilings), then the big and the medium tar pulled by this checkout and (with `old`) by the old
    one, the two in alternating order (A B, B A, ...) so a burst of load from elsewhere hits both.
    Figures: per-round MB/s and CPU seconds (user+sys of the child), medians, and the medians of
    the paired ratios (new/old, import/ceiling of the same round, medium/big of the same round);
    also the voluntary context switches of each pull (threads waiting for one another: what a
    pipeline that hands work on per file or per chunk pays; others' load moves it less than MB/s)."""
    size = (64 if quick else 500) * MB
    workdir = Path(tempfile.mkdtemp(prefix="flatmount-bench-big-", dir=os.environ.get("BENCH_TMP")))
    trees = {"new": ROOT} | ({"old": old} if old is not None else {})
    res: dict[str, dict[str, list[dict]]] = {w: {"big": [], "medium": []} for w in trees}
    sha: list[float] = []
    disk: list[float] = []
    try:
        big, medium = workdir / "big.tar", workdir / "medium.tar"
        _big_tar(big, size)
        _big_tar(medium, size, size // MEDIUM_FILE)
        sizes = {"big": big.stat().st_size, "medium": medium.stat().st_size}
        _quiet()
        for r in range(rounds):
            sha.append(bench_sha256(1024))
            disk.append(max(bench_disk_write(workdir / "disk-baseline", min(size, 256 * MB) // MB)
                            for _ in range(2)))
            (workdir / "disk-baseline").unlink()
            _quiet()
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for kind, tar in (("big", big), ("medium", medium)):
                for which in order:
                    p = _pull_in_child(workdir, tar, f"{which}-{kind}", root=trees[which])
                    p["mb_s"] = sizes[kind] / p["seconds"] / MB
                    res[which][kind].append(p)
                    _quiet()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ceil = [min(a, b) for a, b in zip(sha, disk, strict=True)]
    med = statistics.median
    out: dict = {"rounds": rounds, "layer_mb": round(size / MB), "sha256_mb_s": [round(x) for x in sha],
                 "disk_write_fsync_mb_s": [round(x) for x in disk], "ceiling_median": round(med(ceil))}
    for which, kinds in res.items():
        o: dict = {"write_mode": sorted({p["write_mode"] for ps in kinds.values() for p in ps})}
        for kind, ps in kinds.items():
            o[f"{kind}_mb_s"] = [round(p["mb_s"]) for p in ps]
            o[f"{kind}_mb_s_median"] = round(med(p["mb_s"] for p in ps))
            o[f"{kind}_cpu_s"] = [round(p["cpu_s"], 2) for p in ps]
            o[f"{kind}_cpu_s_median"] = round(med(p["cpu_s"] for p in ps), 3)
            o[f"{kind}_vcsw_median"] = round(med(p["vcsw"] for p in ps))
            o[f"{kind}_vs_ceiling_median"] = round(med(p["mb_s"] / c for p, c in zip(ps, ceil, strict=True)), 3)
        o["medium_vs_big_median"] = round(med(m["mb_s"] / b["mb_s"]
                                              for m, b in zip(kinds["medium"], kinds["big"], strict=True)), 3)
        out[which] = o
    if old is not None:
        for kind in ("big", "medium"):
            pairs = list(zip(res["new"][kind], res["old"][kind], strict=True))
            out[f"{kind}_new_vs_old_mb_s_median"] = round(med(n["mb_s"] / o["mb_s"] for n, o in pairs), 3)
            out[f"{kind}_new_vs_old_cpu_median"] = round(med(n["cpu_s"] / o["cpu_s"] for n, o in pairs), 3)
            out[f"{kind}_new_vs_old_vcsw_median"] = round(med(n["vcsw"] / max(1, o["vcsw"]) for n, o in pairs), 3)
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--small-only", action="store_true", help="only the small-files part")
    ap.add_argument("--big-only", action="store_true", help="only the big and medium files")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of --small-only / --big-only")
    ap.add_argument("--same-fs", action="store_true",
                    help="--small-only: measure in the work dir's file system, not on a fresh one per measurement")
    ap.add_argument("--old", type=Path,
                    help="another checkout whose pull joins the interleaving (--small-only, --big-only)")
    a = ap.parse_args()
    if a.small_only:
        result = run_small(a.quick, a.rounds, a.old.resolve() if a.old else None, a.same_fs)
    elif a.big_only:
        result = run_big(a.quick, a.rounds, a.old.resolve() if a.old else None)
    else:
        result = run(a.quick)
    print(json.dumps(result, indent=2, sort_keys=True))
