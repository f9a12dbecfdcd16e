"""The built-in demo: the whole data flow on the example image, narrated with the CLI equivalents.

import (OCI layout) -> flatten -> private read-only mount -> list and read files -> diff against the
parent image without mounting -> object usage -> unmount.  It runs in a throwaway store under a temp
dir unless a root is given, so it leaves nothing behind on the machine.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

EXAMPLE = Path(__file__).resolve().parent / "examples" / "demo-oci"   # package data


def _step(out: TextIO, title: str, cli: str) -> None:
    out.write(f"\n== {title}\n   $ flatmount {cli}\n")


def _ls(out: TextIO, merged: str, rel: str = "") -> int:
    """`ls -lR`-like listing of the merged dir, depth first in name order; returns the entry count."""
    n = 0
    for name in sorted(os.listdir(merged + rel)):
        path = f"{rel}/{name}"
        st = os.lstat(merged + path)
        extra = f" -> {os.readlink(merged + path)}" if stat.S_ISLNK(st.st_mode) else ""
        out.write(f"   {stat.filemode(st.st_mode)} {st.st_uid:>5}:{st.st_gid:<5} {st.st_size:>6}  "
                  f"{path}{extra}\n")
        n += 1
        if stat.S_ISDIR(st.st_mode):
            n += _ls(out, merged, path)
    return n


def run_demo(out: TextIO | None = None, example: str | os.PathLike | None = None,
             root: str | os.PathLike | None = None) -> int:
    """Run the demo; returns 0 on success (errors propagate as FlatmountError)."""
    out = sys.stdout if out is None else out   # the stream of the moment, not of the import
    from flatmount.diff import diff_images
    from flatmount.flatten import flatten_image
    from flatmount.mount import list_mounts, mount
    from flatmount.pull import pull
    from flatmount.store.core import open_store
    from flatmount.usage import usage

    example = Path(example or EXAMPLE)
    with tempfile.TemporaryDirectory(prefix="flatmount-demo-") as tmp:
        root = Path(root) if root else Path(tmp) / "store"
        with open_store(root, runroot=Path(tmp) / "run") as store:
            out.write(f"flatmount demo: store {store.root}, runtime dir {store.runroot}\n")

            _step(out, "1. import the example OCI layout (two tags sharing two layers)",
                  f"pull oci:{example}:demo-base && flatmount pull oci:{example}:demo")
            for tag in ("demo-base", "demo"):
                t0 = time.perf_counter()
                r = pull(store, f"oci:{example}:{tag}")
                out.write(f"   {tag}: image {r.image.id[:12]}, layers imported {len(r.imported)}, "
                          f"already present {len(r.present)} ({(time.perf_counter() - t0) * 1e3:.0f} ms)\n")

            _step(out, "2. flatten each layer chain into one EROFS metadata image", "flatten demo")
            flats = {}
            for tag in ("demo-base", "demo"):
                t0 = time.perf_counter()
                flats[tag] = f = flatten_image(store, tag)
                out.write(f"   {tag}: {len(f.layers)} layers -> {os.path.relpath(f.path, store.root)} "
                          f"({os.path.getsize(f.path)} bytes, {(time.perf_counter() - t0) * 1e3:.0f} ms)\n")

            _step(out, "3. mount it read-only at a merged dir private to this mount", "mount demo")
            with mount(store, "demo") as merged:
                out.write(f"   merged dir: {merged}\n")
                with open("/proc/self/mountinfo") as mi:
                    for line in mi:
                        if f" {merged} " in line:
                            fields = line.split()
                            out.write(f"   mount options: {fields[5]}, fs: {line.split(' - ')[1].split()[0]}\n")
                _step(out, "4. the files of the flattened image (read through the mount)", "mount demo   # then, as any reader would: ls -lR MERGED")
                n = _ls(out, merged)
                out.write(f"   ({n} entries: /etc/motd and /usr/bin/greet were deleted by layer 3, "
                          f"/opt/app replaced by an opaque dir)\n")
                for rel in ("etc/os-release", "opt/app/main.py"):
                    out.write(f"   --- /{rel}\n")
                    text = Path(merged, rel).read_text()
                    out.write("".join(f"   | {line}\n" for line in text.splitlines()))
            out.write(f"   unmounted; merged dir removed: {not os.path.exists(merged)}\n")

            _step(out, "5. what changed from demo-base to demo (images only, nothing mounted)",
                  "diff demo-base demo")
            for change in diff_images(flats["demo-base"].path, flats["demo"].path, cache_dir=False):
                out.write(f"   {change}\n")

            _step(out, "6. object usage: what is shared, what is unique", "objects usage")
            u = usage(store)
            out.write(f"   objects {u.objects}, bytes stored {u.stored_bytes}, logical bytes "
                      f"{u.logical_bytes}, dedup ratio {u.dedup_ratio:.2f}\n")
            for iu in u.images:
                out.write(f"   {iu.label:<18} total {iu.total_bytes:>6}  unique {iu.unique_bytes:>6}  "
                          f"shared {iu.shared_bytes:>6}\n")

            kept = root != Path(tmp) / "store"
            out.write(f"\nleases left: {len(list_mounts(store))}; " + (
                f"the store is kept in {store.root}\n" if kept else "the store is removed with the temp dir\n"))
    return 0
