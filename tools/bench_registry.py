"""Benchmark: `flatmount pull docker://` against `podman pull` and `skopeo copy docker:// oci:DIR`.

One local registry (Debian's docker-registry on 127.0.0.1, plain HTTP, its blobs in the page cache
after the first pull), one multi-layer image of about 200 MB of gzip layers (40 MB with --quick),
and three pulls of each tool, interleaved round by round, each into a fresh store / storage / dir:

- flatmount: the CLI in a new process, durable import (objects, layer images, SQLite), 3 jobs;
- podman: `podman pull` into a fresh --root/--runroot (overlay driver: layers extracted to disk);
- skopeo: `skopeo copy docker://... oci:DIR` (blobs written as they come, no extraction);
- floors, no registry at all, from the same blobs already on disk: `gzip -dc` of every layer to
  /dev/null (decompression alone, which skopeo copy never does), and `gzip -dc | tar -x` into a
  fresh dir + `sync -f` (the least any importer that extracts the files durably does, with no
  hashing, no records and no fetch).

Reported: each tool's p50 wall time and flatmount's ratio against each (> 1: flatmount is faster).

    python3 tools/bench_registry.py [--quick]      # prints JSON; needs root, podman, skopeo, docker-registry
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = 5
ROUNDS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _layer(n: int, size: int) -> bytes:
    """A layer tar of about `size` bytes: 1 MiB files (half random, half text) and small files."""
    buf = BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        done, i = 0, 0
        while done < size:
            if i % 8 == 7:  # a few dozen small files per layer
                for k in range(32):
                    data = f"layer {n} small {i} {k}\n".encode() * (k + 1)
                    ti = tarfile.TarInfo(f"l{n}/small{i}/f{k}")
                    ti.size, ti.mtime = len(data), 1_700_000_000
                    tf.addfile(ti, BytesIO(data))
                    done += len(data)
            else:
                data = os.urandom(1 << 20) if i % 2 else \
                    hashlib.sha256(f"{n}-{i}".encode()).hexdigest().encode() * ((1 << 20) // 64)
                ti = tarfile.TarInfo(f"l{n}/big{i:04d}")
                ti.size, ti.mtime = len(data), 1_700_000_000
                tf.addfile(ti, BytesIO(data))
                done += len(data)
            i += 1
    return buf.getvalue()


def _oci(path: Path, total: int) -> None:
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict:
        h = hashlib.sha256(data).hexdigest()
        (blobs / h).write_bytes(data)
        return {"digest": "sha256:" + h, "size": len(data)}

    layers, diff_ids = [], []
    for n in range(LAYERS):
        tar = _layer(n, total // LAYERS)
        c = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **put(c.compress(tar) + c.flush())})
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    config = json.dumps({"architecture": arch, "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **put(config)},
                           "layers": layers}).encode()
    m = put(manifest)
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", **m,
         "annotations": {"org.opencontainers.image.ref.name": "bench"}}]}))
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')


def _layer_blobs(layout: Path) -> list[Path]:
    """The layer blobs of the one image in the OCI layout `layout` (manifest order)."""
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":", 1)[1]
    manifest = json.loads((layout / "blobs" / "sha256" / digest).read_text())
    return [layout / "blobs" / "sha256" / d["digest"].split(":", 1)[1] for d in manifest["layers"]]


def _timed(cmd: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed: {p.stderr.strip()[-500:]}")
    return secs


def run(quick: bool = False) -> dict:
    for tool in ("docker-registry", "skopeo", "podman"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (tools/install-deps.sh)")
    total = (40 if quick else 200) * 1000 * 1000
    base = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    reg = None
    try:
        port = _free_port()
        host = f"127.0.0.1:{port}"
        (base / "config.yml").write_text(
            f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {base / 'data'}\nhttp:\n  addr: {host}\n")
        reg = subprocess.Popen(["docker-registry", "serve", str(base / "config.yml")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        _oci(base / "oci", total)
        subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{base / 'oci'}:bench",
                        f"docker://{host}/bench/img:v1"], check=True, capture_output=True)
        image_bytes = sum(f.stat().st_size for f in (base / "oci" / "blobs" / "sha256").iterdir())
        ref = f"docker://{host}/bench/img:v1"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        times: dict[str, list[float]] = {"flatmount": [], "podman": [], "skopeo": [],
                                         "decompress_floor": [], "extract_floor": []}
        # one untimed pull first: the registry's files into the page cache for every tool alike
        subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false", ref, f"oci:{base / 'warm'}:x"],
                       check=True, capture_output=True)
        blobs = " ".join(f"'{b}'" for b in _layer_blobs(base / "warm"))
        for r in range(ROUNDS):
            d = base / f"r{r}"
            os.sync()
            times["flatmount"].append(_timed(
                [sys.executable, "-m", "flatmount", "pull", "-q", "--root", str(d / "fm"), "--runroot",
                 str(d / "fm-run"), "--config", os.devnull, "--tls-verify=false", ref], env))
            os.sync()
            times["podman"].append(_timed(
                ["podman", "--root", str(d / "pm"), "--runroot", str(d / "pm-run"), "--storage-driver",
                 "overlay", "pull", "-q", "--tls-verify=false", ref.removeprefix("docker://")]))
            os.sync()
            times["skopeo"].append(_timed(
                ["skopeo", "copy", "-q", "--src-tls-verify=false", ref, f"oci:{d / 'sk'}:x"]))
            times["decompress_floor"].append(_timed(
                ["sh", "-ec", f"for b in {blobs}; do gzip -dc \"$b\" >/dev/null; done"]))
            os.sync()
            (d / "x").mkdir()
            times["extract_floor"].append(_timed(
                ["sh", "-ec", f"for b in {blobs}; do gzip -dc \"$b\" | tar -x -C '{d / 'x'}'; done; "
                              f"sync -f '{d / 'x'}'"]))
            subprocess.run(["podman", "--root", str(d / "pm"), "--runroot", str(d / "pm-run"),
                            "--storage-driver", "overlay", "system", "reset", "-f"], capture_output=True)
            shutil.rmtree(d, ignore_errors=True)
        p50 = {k: statistics.median(v) for k, v in times.items()}
        return {"image_mb": round(image_bytes / 1e6, 1), "layers": LAYERS, "rounds": ROUNDS,
                "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
                "p50_s": {k: round(v, 3) for k, v in p50.items()},
                "flatmount_mb_s": round(image_bytes / p50["flatmount"] / 1e6, 1),
                "speedup_vs_podman": round(p50["podman"] / p50["flatmount"], 2),
                "speedup_vs_skopeo_copy": round(p50["skopeo"] / p50["flatmount"], 2),
                # > 1: even the extraction floor is slower than skopeo copy, so no importer that
                # extracts the files can be faster than skopeo copy on this host
                "extract_floor_over_skopeo_copy": round(p50["extract_floor"] / p50["skopeo"], 2),
                "decompress_floor_over_skopeo_copy": round(p50["decompress_floor"] / p50["skopeo"], 2),
                "flatmount_over_extract_floor": round(p50["flatmount"] / p50["extract_floor"], 2)}
    finally:
        if reg is not None:
            reg.terminate()
            reg.wait()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=2))
