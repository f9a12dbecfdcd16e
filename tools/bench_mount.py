"""Benchmark: mount_image + umount_image of a small image, next to a plain overlay mount; and the CLI.

The baseline is what container engines do without flatmount: a legacy overlay mount (mount(2),
i.e. `mount -t overlay` without the fork/exec of mount(8)) of 5 extracted layer directories, then
umount2.  Both run interleaved in the same process, cycle by cycle, so machine noise hits both.

The CLI part (`cli`) times `flatmount mount IMAGE` and `flatmount umount DIR` of a flattened image
in a store, and a `mount-image` + `umount-image` cycle, each as a fresh process, interleaved with
the floor: `python3 -c pass` started the same way (same interpreter, same flags, same environment).
Target: mount and umount each within 15 ms of that floor (p50).  `python3 -m flatmount` and the
console script are timed side by side.

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

from flatmount.kernel import kmount  # noqa: E402

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
        from flatmount.image.writer import write_image
    except ImportError:
        write_image = None
    if write_image is not None:
        from flatmount.image.tree import S_IFREG, Inode

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
        return image, objects, "flatmount.image.writer"
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


def _timed(cmd: list[str], env: dict) -> tuple[float, str]:
    """Wall time of one fresh process (it must succeed) and its stdout."""
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True)
    took = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
    return took, r.stdout


def _console_script() -> str | None:
    """The `flatmount` console script installed beside this interpreter (pip's entry point), if any."""
    path = Path(sys.executable).with_name("flatmount")
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def _instructions(cmd: list[str], env: dict, out_dir: Path) -> tuple[int, str]:
    """User-space instructions one process executes (valgrind's callgrind, which is deterministic,
    unlike wall time on a shared VM) and its stdout."""
    out = out_dir / "callgrind.out"
    r = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *cmd], env=env,
                       cwd=str(ROOT), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"valgrind {' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()[-300:]}")
    out.unlink(missing_ok=True)
    line = next(x for x in r.stderr.splitlines() if "Collected :" in x)
    return int(line.split(":")[-1]), r.stdout


def run_cli(quick: bool, workdir: str | None = None) -> dict:
    """p50/p95 of the CLI's mount, umount and mount-image cycle against `python3 -c pass`, interleaved."""
    from flatmount.api import open_store
    from flatmount.flatten import flatten_image

    runs = 20 if quick else 60
    base = Path(tempfile.mkdtemp(prefix="bench-cli-", dir=workdir))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    py = [sys.executable]
    script = _console_script()
    mnt = base / "mnt"
    mnt.mkdir()
    root, runroot = str(base / "root"), str(base / "run")
    where = ["--root", root, "--runroot", runroot]
    times: dict[str, list[float]] = {}

    def add(name: str, took: float) -> None:
        times.setdefault(name, []).append(took)

    try:
        with open_store(root, runroot=runroot) as store:
            store.pull(f"oci:{ROOT / 'flatmount' / 'examples' / 'demo-oci'}:demo")
            flat = flatten_image(store, "demo")
            objects = str(store.objects_dir)
        # `-S`: no site, so no .pth file of the environment loads modules before the floor is timed
        # (a sandbox's preloaded typing, re, pathlib, tempfile hid 35 ms of our imports from the target)
        ways = {"python -m flatmount": [*py, "-m", "flatmount"], "python -S -m flatmount": [*py, "-S", "-m", "flatmount"]}
        if script is not None:
            ways["console script"] = [script]
        for i in range(runs + 1):   # the first round warms the page cache and is not counted
            keep = i > 0
            floor, _ = _timed([*py, "-c", "pass"], env)
            floor_s, _ = _timed([*py, "-S", "-c", "pass"], env)
            if keep:
                add("python_c_pass", floor)
                add("python_S_c_pass", floor_s)
            for way, cmd in ways.items():
                took, out = _timed([*cmd, "mount", "demo", *where], env)
                merged = out.strip()
                took2, _ = _timed([*cmd, "umount", merged, *where], env)
                if keep:
                    add(f"{way}: mount", took)
                    add(f"{way}: umount", took2)
            took, _ = _timed([*py, "-m", "flatmount", "mount-image", flat.path, str(mnt), "--objects", objects], env)
            took2, _ = _timed([*py, "-m", "flatmount", "umount-image", str(mnt)], env)
            if keep:
                add("python -m flatmount: mount-image + umount-image cycle", took + took2)
        if shutil.which("valgrind"):   # the same commands counted in instructions (millions), once each
            count = {"python_c_pass": _instructions([*py, "-c", "pass"], env, base)[0]}
            n, out = _instructions([*py, "-m", "flatmount", "mount", "demo", *where], env, base)
            count["mount"] = n
            count["umount"] = _instructions([*py, "-m", "flatmount", "umount", out.strip(), *where], env, base)[0]
            floor = count["python_c_pass"]
            instructions = {k: round(v / 1e6, 1) for k, v in count.items()}
            for k in ("mount", "umount"):
                instructions[f"{k}_over_floor"] = round((count[k] - floor) / 1e6, 1)
                # in ms at the rate the floor ran when the VM was least busy (its fastest run)
                instructions[f"{k}_over_floor_ms_est"] = round(
                    (count[k] - floor) / floor * min(times["python_c_pass"]) * 1e3, 1)
        else:
            instructions = None
        floor_p50 = statistics.median(times["python_c_pass"])
        result: dict = {"runs": runs, "console_script": script, "instructions_millions": instructions,
                        "note": "fresh processes, interleaved; over_floor_ms = p50 minus the p50 of "
                                "`python3 -c pass` in the same run (twice for a two-process cycle; "
                                "`python3 -S -c pass` for `python -S`, which no .pth file of the "
                                "environment reaches); target: mount, umount <= 15 ms"}
        floor_s_p50 = statistics.median(times["python_S_c_pass"])
        for name, xs in times.items():
            result[name] = _pct(xs)
            if not name.endswith("_c_pass"):   # (a cycle is two processes: two floors)
                floors = 2 if name.endswith("cycle") else 1
                floor0 = floor_s_p50 if name.startswith("python -S") else floor_p50
                result[name]["over_floor_ms"] = round((statistics.median(xs) - floors * floor0) * 1e3, 1)
        return result
    finally:
        while kmount.is_mountpoint(str(mnt)):
            kmount.umount_image(str(mnt), lazy=True)
        for m in reversed(kmount.mounts()):
            if m.mountpoint.startswith(str(base) + "/"):
                kmount.umount_image(m.mountpoint, lazy=True)
        shutil.rmtree(base)


def run(quick: bool, workdir: str | None = None) -> dict:
    """p50/p95 of mount+umount cycles: flatmount (file-backed and loop) vs 5-lowerdir overlay; the CLI."""
    result = run_kernel(quick, workdir)
    result["cli"] = run_cli(quick, workdir)
    return result


def run_kernel(quick: bool, workdir: str | None = None) -> dict:
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
