#!/usr/bin/env python3
"""Benchmark of gc and the object-usage reports on a big store: 200,000 objects, 20 images (quick:
20,000 objects).  Target: gc < 5 s for 200,000 objects, with nothing to free and with 10% to free.

How the store is built: objects are small distinct random contents (65-1000 bytes) put through
ObjectStore.put_bytes (one sync at the end); layers and images are recorded through the REAL recording
path (flatmount.store.batch.record_layer / record_image: EROFS layer image + layer row + refs rows in one
transaction), with layer trees built directly from the digests rather than from tarballs (a tar import
of 200,000 files would measure the importer, not gc).  Shape: 4 base layers of N/4 objects each, and
20 images = one base + one top layer of their own (N/40 objects), so every base is shared by 5 images.
The first images are flattened (flatten_image) so gc has flat images to keep.  "10% to free": images
whose top layers hold 10% of the objects are removed (rmi), then gc runs.

    python tools/bench_gc.py [--quick]
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BENCH_DIR = "/var/tmp"
IMAGES = 20
BASES = 4
FLATTENED = 4
TARGET_GC_S = 5.0


def _tree(digests: list[tuple[bytes, int]]):
    """A layer tree of regular files (100 per directory) pointing at the given objects."""
    from flatmount.image.tree import S_IFREG, Inode

    root = Inode.directory(0o755, mtime_ns=1)
    for i, (d, size) in enumerate(digests):
        sub = root.entries.setdefault(f"d{i // 100:05d}".encode(), Inode.directory(0o755, mtime_ns=1))
        sub.entries[f"f{i:07d}".encode()] = Inode(S_IFREG | 0o644, mtime_ns=1, size=size, digest=d)
    return root


def _put_objects(objects, n: int, rng: random.Random, tag: bytes) -> list[tuple[bytes, int]]:
    out = []
    for i in range(n):
        size = rng.randint(65, 1000)
        data = tag + i.to_bytes(8, "little") + rng.randbytes(size - len(tag) - 8)
        out.append((objects.put_bytes(data), size))
    return out


def build(root: str, n_objects: int) -> dict:
    """The store described in the module docstring; returns build timings and image names."""
    from flatmount.api import open_store
    from flatmount.flatten import flatten_image
    from flatmount.store.batch import record_image, record_layer
    from flatmount.store.records import chain_id

    rng = random.Random(42)
    store = open_store(root, runroot=root + "-run")
    per_base = n_objects // 2 // BASES
    per_top = n_objects // 2 // IMAGES
    t0 = time.perf_counter()
    with store.gc_lock(shared=True):
        bases = [_put_objects(store.objects, per_base, rng, b"base%d" % b) for b in range(BASES)]
        tops = [_put_objects(store.objects, per_top, rng, b"top%d" % i) for i in range(IMAGES)]
        store.objects.sync()
    t_put = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_ids = []
    for b, objs in enumerate(bases):
        diff_id = "sha256:" + hashlib.sha256(b"bench base %d" % b).hexdigest()
        lid = chain_id(None, diff_id)
        record_layer(store, lid, None, diff_id, _tree(objs))
        base_ids.append(lid)
    names = []
    for i, objs in enumerate(tops):
        parent = base_ids[i % BASES]
        diff_id = "sha256:" + hashlib.sha256(b"bench top %d" % i).hexdigest()
        lid = chain_id(parent, diff_id)
        record_layer(store, lid, parent, diff_id, _tree(objs))
        image_id = hashlib.sha256(b"bench image %d" % i).hexdigest()
        name = f"bench/img{i:02d}"
        record_image(store, image_id, lid, config={"bench": i}, names=[name])
        names.append(name)
    t_record = time.perf_counter() - t0
    t0 = time.perf_counter()
    for name in names[:FLATTENED]:
        flatten_image(store, name)
    t_flatten = time.perf_counter() - t0
    store.close()
    return {"names": names, "per_top": per_top, "put_s": round(t_put, 2), "record_s": round(t_record, 2),
            "flatten_s": round(t_flatten, 2)}


def _timed(fn, *args, **kw):
    t0 = time.perf_counter()
    res = fn(*args, **kw)
    return res, round(time.perf_counter() - t0, 3)


def _drop_caches() -> None:
    """Cold dentry/inode caches where allowed (root), so gc's directory scan is measured honestly."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")
    except OSError:
        pass


def run(quick: bool) -> dict:
    from flatmount.api import open_store
    from flatmount.gc import gc
    from flatmount.usage import object_refs, share, top, usage

    n = 20_000 if quick else 200_000
    work = tempfile.mkdtemp(prefix="bench-gc-", dir=BENCH_DIR)
    root = os.path.join(work, "store")
    try:
        info = build(root, n)
        store = open_store(root, runroot=root + "-run")
        out: dict = {"objects": n, "images": IMAGES, "build": {k: v for k, v in info.items() if k != "names"}}
        res, out["gc_nothing_s"] = _timed(gc, store, grace_s=0)
        assert res.objects_removed == 0 and res.objects_kept == n, res
        _drop_caches()
        res, out["gc_nothing_cold_s"] = _timed(gc, store, grace_s=0)
        res, out["gc_dry_run_s"] = _timed(gc, store, dry_run=True, grace_s=0)
        rep, out["usage_s"] = _timed(usage, store)
        out["dedup_ratio"] = rep.dedup_ratio
        _, out["share_s"] = _timed(share, store)
        _, out["top_s"] = _timed(top, store, 20)
        some = next(iter(store.objects)).hex()
        _, out["refs_s"] = _timed(object_refs, store, some)
        # 10% to free: remove images whose top layers hold n/10 objects (their flat images go too)
        victims = info["names"][: (n // 10) // info["per_top"]]
        for name in victims:
            store.remove_image(name)
        res, out["gc_10pct_s"] = _timed(gc, store, grace_s=0)
        out["gc_10pct_removed"] = res.objects_removed
        assert res.objects_removed == len(victims) * info["per_top"], res
        out["gc_10pct_flat_images_removed"] = len(res.images_removed)
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    worst = max(out["gc_nothing_s"], out["gc_nothing_cold_s"], out["gc_10pct_s"])
    out["target_gc_s"] = TARGET_GC_S
    out["gc_within_target"] = worst < TARGET_GC_S if not quick else None
    return out


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv[1:]), indent=2, sort_keys=True))
