#!/usr/bin/env python3
"""Write the small deterministic OCI image layout `flatmount/examples/demo-oci/` (tags `demo`, `demo-base`).

Four layers exercising what an importer must get right, all with fixed mtimes and numeric owners:
1. base (tar+gzip): /etc, /usr/bin (a script with an xattr, a hardlink, a symlink), /opt/app;
2. update (tar+gzip): adds /etc/motd and /usr/share/doc/demo/README, changes /etc/os-release;
3. cleanup (tar+zstd): deletes /etc/motd and /usr/bin/greet (`.wh.`), replaces /opt/app with an
   opaque directory (`.wh..wh..opq`, listed after the new files on purpose);
4. release (plain tar): adds /etc/demo-release.
Files over 64 bytes become objects, smaller ones are inlined.  Re-running gives the same tar bytes
(the config's diff_ids pin them); gzip/zstd bytes depend only on the zlib/zstd versions.

    python3 tools/make_example.py [DEST]     # default: flatmount/examples/demo-oci (package data)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = ROOT / "flatmount" / "examples" / "demo-oci"
TAG = "demo"
BASE_TAG = "demo-base"
T0 = 1_704_067_200  # 2024-01-01T00:00:00Z
T1 = T0 + 86_400
T2 = T1 + 86_400
T3 = T2 + 86_400

OS_RELEASE_1 = b'NAME="Demo Linux"\nVERSION="1.0"\nID=demo\nPRETTY_NAME="Demo Linux 1.0 (flatmount example)"\n'
OS_RELEASE_2 = b'NAME="Demo Linux"\nVERSION="1.1"\nID=demo\nPRETTY_NAME="Demo Linux 1.1 (flatmount example)"\n'
PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
HELLO = b'#!/bin/sh\n# flatmount demo\necho "hello from the flatmount demo image (layer chain: 4 layers)"\n'
APP_V1 = b'"""Demo app, version 1 (replaced by layer 3)."""\n\nprint("app v1")\n' + b"# padding\n" * 8
APP_CONFIG = json.dumps({"name": "demo", "version": 1, "features": ["a", "b", "c"], "debug": False},
                        indent=2).encode() + b"\n"
APP_DATA = bytes(range(256)) * 16  # 4 KiB of binary data
MOTD = b"Welcome to the flatmount demo image.\nThis file is added by layer 2 and deleted by layer 3.\n"
README = b"flatmount demo\n==============\n\n" + b"This image exists to exercise layer import.\n" * 20
MAIN_V2 = b'"""Demo app, version 2: the whole /opt/app directory was replaced."""\n\nprint("app v2")\n'


class _Tar:
    """A PAX tar built in memory with explicit, fixed metadata for every entry."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.tf = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)

    def _info(self, name: str, mtime: int, mode: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = mtime, mode, uid, gid, "", ""
        return ti

    def dir(self, name: str, mtime: int, mode: int = 0o755) -> None:
        ti = self._info(name, mtime, mode)
        ti.type = tarfile.DIRTYPE
        self.tf.addfile(ti)

    def file(self, name: str, data: bytes, mtime: int, mode: int = 0o644, xattrs: dict | None = None,
             uid: int = 0, gid: int = 0) -> None:
        ti = self._info(name, mtime, mode, uid, gid)
        ti.size = len(data)
        if xattrs:
            ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
        self.tf.addfile(ti, io.BytesIO(data))

    def symlink(self, name: str, target: str, mtime: int) -> None:
        ti = self._info(name, mtime, 0o777)
        ti.type, ti.linkname = tarfile.SYMTYPE, target
        self.tf.addfile(ti)

    def hardlink(self, name: str, target: str, mtime: int) -> None:
        ti = self._info(name, mtime, 0o755)
        ti.type, ti.linkname = tarfile.LNKTYPE, target
        self.tf.addfile(ti)

    def whiteout(self, name: str, mtime: int) -> None:
        self.file(name, b"", mtime, mode=0o644)

    def bytes(self) -> bytes:
        self.tf.close()
        return self.buf.getvalue()


def layer_tars() -> list[bytes]:
    """The four uncompressed layer tars."""
    t = _Tar()
    t.dir("./", T0)
    t.dir("etc/", T0)
    t.file("etc/os-release", OS_RELEASE_1, T0)
    t.file("etc/passwd", PASSWD, T0)
    t.file("etc/group", b"root:x:0:\n", T0)
    t.file("etc/hostname", b"demo\n", T0)
    t.dir("usr/", T0)
    t.dir("usr/bin/", T0)
    t.file("usr/bin/hello", HELLO, T0, mode=0o755, xattrs={"user.flatmount.demo": "hello"})
    t.hardlink("usr/bin/hi", "usr/bin/hello", T0)
    t.symlink("usr/bin/greet", "hello", T0)
    t.dir("opt/", T0)
    t.dir("opt/app/", T0)
    t.file("opt/app/app.py", APP_V1, T0)
    t.file("opt/app/config.json", APP_CONFIG, T0)
    t.dir("opt/app/data/", T0, mode=0o750)
    t.file("opt/app/data/table.bin", APP_DATA, T0, mode=0o640, uid=1000, gid=1000)
    base = t.bytes()

    t = _Tar()
    t.dir("etc/", T1)
    t.file("etc/os-release", OS_RELEASE_2, T1)
    t.file("etc/motd", MOTD, T1)
    t.dir("usr/", T1)
    t.dir("usr/share/", T1)
    t.dir("usr/share/doc/", T1)
    t.dir("usr/share/doc/demo/", T1)
    t.file("usr/share/doc/demo/README", README, T1)
    update = t.bytes()

    t = _Tar()
    t.dir("etc/", T2)
    t.whiteout("etc/.wh.motd", T2)
    t.dir("usr/", T0)
    t.dir("usr/bin/", T2)
    t.whiteout("usr/bin/.wh.greet", T2)
    t.dir("opt/", T2)
    t.dir("opt/app/", T2)
    t.file("opt/app/main.py", MAIN_V2, T2)
    t.file("opt/app/VERSION", b"2\n", T2)
    t.whiteout("opt/app/.wh..wh..opq", T2)
    cleanup = t.bytes()

    t = _Tar()
    t.dir("etc/", T3)
    t.file("etc/demo-release", b"flatmount demo 4\n", T3)
    release = t.bytes()
    return [base, update, cleanup, release]


def _gzip(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip header: mtime 0, no name
    return c.compress(data) + c.flush()


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=19, write_checksum=True, threads=0).compress(data)


LAYER_FORMS = [
    ("application/vnd.oci.image.layer.v1.tar+gzip", _gzip),
    ("application/vnd.oci.image.layer.v1.tar+gzip", _gzip),
    ("application/vnd.oci.image.layer.v1.tar+zstd", _zstd),
    ("application/vnd.oci.image.layer.v1.tar", lambda b: b),
]


def _json(doc: dict) -> bytes:
    return json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"


def build(dest: str | os.PathLike) -> dict:
    """Write the layout at `dest` (replacing it); returns {"manifest": digest, "config": digest}."""
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        h = hashlib.sha256(data).hexdigest()
        (blobs / h).write_bytes(data)
        return "sha256:" + h

    tars = layer_tars()
    layers = []
    for tar, (media_type, compress) in zip(tars, LAYER_FORMS, strict=True):
        blob = compress(tar)
        layers.append({"mediaType": media_type, "digest": put(blob), "size": len(blob)})
    created = ["2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z", "2024-01-03T00:00:00Z", "2024-01-04T00:00:00Z"]
    diff_ids = ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]

    def image(n: int, tag: str) -> dict:
        """Config + manifest for the first `n` layers; returns the index descriptor (tagged)."""
        config = {
            "architecture": "amd64",
            "os": "linux",
            "created": created[n - 1],
            "config": {"Cmd": ["/usr/bin/hello"], "Env": ["PATH=/usr/bin:/bin"], "WorkingDir": "/opt/app"},
            "rootfs": {"type": "layers", "diff_ids": diff_ids[:n]},
            "history": [{"created": c, "created_by": f"make_example.py layer {i + 1}"}
                        for i, c in enumerate(created[:n])],
        }
        config_bytes = _json(config)
        config_desc = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(config_bytes),
                       "size": len(config_bytes)}
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": config_desc, "layers": layers[:n]}
        manifest_bytes = _json(manifest)
        return {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(manifest_bytes),
                "size": len(manifest_bytes), "annotations": {"org.opencontainers.image.ref.name": tag},
                "platform": {"architecture": "amd64", "os": "linux"}, "_config": config_desc["digest"]}

    # `demo` is the whole chain; `demo-base` its first two layers (a parent to diff against)
    descs = [image(len(tars), TAG), image(2, BASE_TAG)]
    info = {"manifest": descs[0]["digest"], "config": descs[0].pop("_config")}
    descs[1].pop("_config")
    manifest_desc = descs[0]
    (dest / "index.json").write_bytes(_json({"schemaVersion": 2, "manifests": descs}))
    (dest / "oci-layout").write_bytes(_json({"imageLayoutVersion": "1.0.0"}))
    assert manifest_desc is descs[0]
    return info


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    dest = Path(args[0]) if args else DEFAULT_DEST
    info = build(dest)
    total = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"wrote {dest} ({total} bytes): manifest {info['manifest']}, config (image id) {info['config']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
