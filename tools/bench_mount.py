"""Benchmark: mount_image + umount_image of a small image, next to a plain overlay mount.

The baseline is what container engines do without flatmount: a legacy overlay mount (mount(2),
i.e. `mount -t overlay` without the fork/exec of mount(8)) of 5 extracted layer directories, then
umount2.  Both run interleaved in the same process, cycle by cycle, so machine noise hits both.

    python3 tools/bench_mount.py [--quick]      # prints JSON; needs root
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flatmount import kmount  # noqa: E402

N_LAYERS = 5
FILES_PER_LAYER = 40
MTIME = 1_700_000_000


def _content(layer: int, i: int) -> bytes:
    return (f"layer {layer} file {i}\n" * (8 + i % 50)).encode()


def _layers(base: Path) -> list[Path]:
    """5 extracted layer dirs (a few subdirs, files of 150 B to 1.2 KiB)."""
    dirs = []
    for n in range(N_LAYERS):
        d = base / f"layer{n}"
        for i in range(FILES_PER_LAYER):
            p = d / f"d{i % 4}" / f"l{n}f{i}"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(_content(n, i))
        dirs.append(d)
    return dirs


def _image(base: Path, layers: list[Path]) -> tuple[Path, Path, str]:
    """The flattened equivalent of `layers` as an EROFS image plus an objects dir."""
    objects = base / "objects"
    image = base / "image.erofs"
    files = {}
    for d in layers:
        for p in sorted(d.rglob("*")):
            if p.is_file():
                files[p.relative_to(d).as_posix()] = p.read_bytes()
    for data in files.values():
        h = hashlib.sha256(data).hexdigest()
        o = objects / h[:2] / h[2:]
        o.parent.mkdir(parents=True, exist_ok=True)
        o.write_bytes(data)
    try:
        from flatmount.erofs.writer import write_image
    except ImportError:
        write_image = None
    if write_image is not None:
        from flatmount.tree import S_IFREG, Inode

        root = Inode.directory(mtime_ns=MTIME * 10**9)
        for rel, data in files.items():
            node = root
            *parents, name = rel.split("/")
            for part in parents:
                node = node.entries.setdefault(part.encode(), Inode.directory(mtime_ns=MTIME * 10**9))
            if len(data) <= 64:
                node.entries[name.encode()] = Inode.file(data, mtime_ns=MTIME * 10**9)
            else:
                node.entries[name.encode()] = Inode(S_IFREG | 0o644, size=len(data), mtime_ns=MTIME * 10**9,
                                                    digest=bytes.fromhex(hashlib.sha256(data).hexdigest()))
        write_image(root, str(image))
        return image, objects, "flatmount.erofs.writer"
    staging = base / "staging"
    for rel, data in files.items():
        p = staging / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            f.truncate(len(data))
        h = hashlib.sha256(data).hexdigest()
        os.setxattr(p, "trusted.overlay.metacopy", b"")
        os.setxattr(p, "trusted.overlay.redirect", f"/{h[:2]}/{h[2:]}".encode())
    subprocess.run(["mkfs.erofs", "-T", str(MTIME), str(image), str(staging)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return image, objects, "mkfs.erofs"


def _pct(xs: list[float]) -> dict:
    s = sorted(xs)
    return {
        "p50_ms": round(statistics.median(s) * 1e3, 3),
        "p95_ms": round(s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))] * 1e3, 3),
        "min_ms": round(s[0] * 1e3, 3),
    }


def run(quick: bool, workdir: str | None = None) -> dict:
    """p50/p95 of mount+umount cycles: flatmount (file-backed and loop) vs 5-lowerdir overlay."""
    if os.geteuid() != 0:
        raise SystemExit("bench_mount needs root (real mounts)")
    cycles = 50 if quick else 200
    base = Path(tempfile.mkdtemp(prefix="bench-mount-", dir=workdir))
    mnt = base / "mnt"
    mnt.mkdir()
    times: dict[str, list[float]] = {"flatmount": [], "flatmount_loop": [], "overlay_5_lowerdirs": []}
    try:
        layers = _layers(base)
        image, objects, builder = _image(base, layers)
        lowerdir = ":".join(str(d) for d in reversed(layers))  # top layer first
        m, im, ob = str(mnt), str(image), [str(objects)]

        def flat() -> None:
            kmount.mount_image(im, m, ob)
            kmount.umount_image(m)

        def flat_loop() -> None:
            kmount.mount_image(im, m, ob, loop=True)
            kmount.umount_image(m)

        def baseline() -> None:
            kmount._mount2("overlay", m, "overlay", kmount.MS_RDONLY | kmount.MS_NOSUID | kmount.MS_NODEV,
                           f"lowerdir={lowerdir}")
            kmount._umount2(m, 0)

        runs = {"flatmount": flat, "flatmount_loop": flat_loop, "overlay_5_lowerdirs": baseline}
        for fn in runs.values():  # warm up: module caches, learned api, dentries
            fn()
        for _ in range(cycles):
            for name, fn in runs.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        kmount.mount_image(im, m, ob)
        try:  # the two views must agree, or the comparison means nothing
            for rel in ("d0/l0f0", "d3/l4f39"):
                layer = int(rel.split("/")[1][1])
                assert (mnt / rel).read_bytes() == (layers[layer] / rel).read_bytes()
        finally:
            kmount.umount_image(m)
        result = {
            "cycles": cycles,
            "image_bytes": image.stat().st_size,
            "files": N_LAYERS * FILES_PER_LAYER,
            "image_builder": builder,
            "api": kmount._learned_api,
            "kernel": platform.release(),
            "note": "one cycle = mount + umount; baseline = mount(2) overlay with 5 lowerdirs",
        }
        for name, xs in times.items():
            result[name] = _pct(xs)
        return result
    finally:
        while kmount.is_mountpoint(str(mnt)):
            kmount.umount_image(str(mnt), lazy=True)
        shutil.rmtree(base)


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv[1:]), indent=2))
