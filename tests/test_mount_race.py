"""Concurrency: 4 processes mount / read every file / unmount the same image (layers in an additional
store) while a fifth mounts and unmounts in a loop.  Zero errors; every read sees complete content.

FLATMOUNT_RACE_CYCLES sets the cycles per reader (the issue's full run: 300; default: 300, about 10 s here).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

from conftest import ROOT, require_root
from layerdirs import file_tree, store_image
from test_mount import check_consistent, unmount_everything_below

from flatmount.api import open_store
from flatmount.mount import list_mounts, mounts_dir

WORKER = r"""
import hashlib, json, os, sys, time, traceback
sys.path.insert(0, {root!r})
from flatmount.mount import mount_image_ref, umount
from flatmount.api import open_store

mode, cycles, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = open_store({primary!r}, additional=[{ais!r}], runroot={run!r})

def content_hash(merged):
    files = {{}}
    for dirpath, dirs, names in os.walk(merged):
        for f in names:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                files[os.path.relpath(p, merged)] = fh.read()
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(path.encode() + b"\0" + files[path] + b"\0")
    return h.hexdigest(), len(files)

done, errors, t0 = 0, [], time.perf_counter()
while (done < cycles) if mode == "reader" else not os.path.exists(stop):
    try:
        lease = mount_image_ref(s, "base")
        try:
            if mode == "reader":
                got = content_hash(lease.merged)
                if got != ({expect!r}, {nfiles!r}):
                    errors.append(f"cycle {{done}}: incomplete content {{got}}")
        finally:
            umount(s, lease.id)
    except Exception:
        errors.append(traceback.format_exc())
    done += 1
print(json.dumps({{"mode": mode, "cycles": done, "errors": errors[:5], "nerrors": len(errors),
                  "seconds": time.perf_counter() - t0}}))
"""


def make_tree_files(n: int = 120) -> list[dict[str, bytes]]:
    """Three layers: many small and large files, then replacements and deletions."""
    base = {f"usr/lib/f{i:03}": (b"%03d" % i) * (1 + (i * 37) % 900) for i in range(n)}
    mid = {f"usr/lib/f{i:03}": b"<whiteout>" for i in range(0, n, 7)}
    mid.update({f"etc/conf{i}": b"c%d" % i * 50 for i in range(20)})
    top = {f"usr/lib/f{i:03}": b"new %d" % i * 30 for i in range(1, n, 5)}
    return [base, mid, top]


def expected(layers: list[dict[str, bytes]]) -> tuple[str, int]:
    files: dict[str, bytes] = {}
    for layer in layers:
        for path, data in layer.items():
            if data == b"<whiteout>":
                files.pop(path, None)
            else:
                files[path] = data
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(path.encode() + b"\0" + files[path] + b"\0")
    return h.hexdigest(), len(files)


def test_concurrent_mount_read_unmount(tmp_path):
    require_root()
    cycles = int(os.environ.get("FLATMOUNT_RACE_CYCLES", "300"))
    layers = make_tree_files()
    ais_root, primary, run = str(tmp_path / "ais"), str(tmp_path / "p"), str(tmp_path / "run")
    ais = open_store(ais_root, runroot=run)
    blobs = sorted({d for layer in layers for d in layer.values() if len(d) > 64 and d != b"<whiteout>"})
    store_image(ais, [file_tree(f, mtime_ns=(i + 1) * 10**18) for i, f in enumerate(layers)], "base",
                blobs=blobs)
    ais.close()
    expect, nfiles = expected(layers)
    stop = str(tmp_path / "stop")
    script = WORKER.format(root=str(ROOT), primary=primary, ais=ais_root, run=run, expect=expect,
                           nfiles=nfiles)
    procs = []
    try:
        t0 = time.perf_counter()
        for mode in ["reader"] * 4 + ["churn"]:
            procs.append(subprocess.Popen([sys.executable, "-c", script, mode, str(cycles), stop],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        results = []
        for p in procs[:4]:
            out, err = p.communicate(timeout=1800)
            assert p.returncode == 0, err
            results.append(json.loads(out))
        open(stop, "w").close()
        out, err = procs[4].communicate(timeout=300)
        assert procs[4].returncode == 0, err
        results.append(json.loads(out))
        wall = time.perf_counter() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        open(stop, "a").close()
        store = open_store(primary, additional=[ais_root], runroot=run)
        try:
            check_consistent(store)
        finally:
            unmount_everything_below(str(tmp_path))
    print(f"race: {cycles} cycles x 4 readers + churn {results[4]['cycles']} cycles in {wall:.1f} s; "
          f"errors {[r['nerrors'] for r in results]}")
    for r in results:
        assert r["nerrors"] == 0, r["errors"]
    assert [r["cycles"] for r in results[:4]] == [cycles] * 4
    assert results[4]["cycles"] > 0
    assert list_mounts(store) == [] and os.listdir(mounts_dir(store)) == []
