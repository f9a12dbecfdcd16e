#!/usr/bin/env python3
"""A small real image for containers: busybox-static (from apt) packed as one layer, as an OCI layout.

Used by the run tests and `bench.py run` (no registry here).  The rootfs has what a container needs to
start on a read-only root: /proc, /dev, /sys, /tmp, /run, /etc/{hostname,hosts,resolv.conf}, a
passwd/group with a non-root user, /bin/sh and the usual applets as symlinks to /bin/busybox.

    python3 tools/busybox_image.py DEST [TAG]
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

APPLETS = ("sh", "true", "false", "echo", "cat", "ls", "id", "env", "pwd", "sleep", "touch", "ip",
           "ping", "nc", "kill", "hostname", "mount", "grep", "wc", "test", "stat", "readlink", "ps",
           "whoami", "tee", "mkdir", "rm", "seq", "printf", "head", "dd", "cut", "stty")
PASSWD = (b"root:x:0:0:root:/root:/bin/sh\n"
          b"app:x:1000:1000:app user:/home/app:/bin/sh\n"
          b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
GROUP = b"root:x:0:\napp:x:1000:\nwheel:x:10:app\nnogroup:x:65534:\n"
MTIME = 1_700_000_000


def busybox_path() -> str:
    for p in ("/bin/busybox", "/usr/bin/busybox"):
        if os.path.isfile(p):
            return p
    found = shutil.which("busybox")
    if found is None:
        raise FileNotFoundError("busybox is not installed (apt-get install busybox-static)")
    return found


def layer_tar(extra: dict[str, bytes] | None = None) -> bytes:
    """The rootfs as an uncompressed tar (deterministic for a given busybox binary)."""
    buf = io.BytesIO()
    tf = tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT)

    def info(name: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = kind, mode, uid, gid, MTIME
        return ti

    for d, mode in (("./", 0o755), ("bin", 0o755), ("etc", 0o755), ("proc", 0o555), ("dev", 0o755),
                    ("sys", 0o555), ("tmp", 0o1777), ("run", 0o755), ("root", 0o700), ("home", 0o755),
                    ("var", 0o755), ("srv", 0o755), ("mnt", 0o755)):
        tf.addfile(info(d, tarfile.DIRTYPE, mode))
    tf.addfile(info("home/app", tarfile.DIRTYPE, 0o755, 1000, 1000))
    data = Path(busybox_path()).read_bytes()
    ti = info("bin/busybox", tarfile.REGTYPE, 0o755)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))
    for a in APPLETS:
        ti = info(f"bin/{a}", tarfile.SYMTYPE, 0o777)
        ti.linkname = "busybox"
        tf.addfile(ti)
    files = {"etc/passwd": PASSWD, "etc/group": GROUP, "etc/hostname": b"image\n",
             "etc/hosts": b"", "etc/resolv.conf": b"", **(extra or {})}
    for name, content in files.items():
        ti = info(name, tarfile.REGTYPE, 0o644)
        ti.size = len(content)
        tf.addfile(ti, io.BytesIO(content))
    tf.close()
    return buf.getvalue()


def write_oci(dest: str | os.PathLike, tag: str = "busybox", config: dict | None = None,
              tar: bytes | None = None) -> str:
    """An OCI image layout at `dest` holding the busybox rootfs with image config `config` (the
    `config` member: Entrypoint, Cmd, Env, WorkingDir, User, Labels).  Returns `oci:DEST:TAG`."""
    dest = Path(dest)
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> dict:
        h = hashlib.sha256(data).hexdigest()
        (blobs / h).write_bytes(data)
        return {"digest": "sha256:" + h, "size": len(data)}

    tar = layer_tar() if tar is None else tar
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar", **put(tar)}
    cfg = {"architecture": "amd64", "os": "linux",
           "config": config if config is not None else {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
           "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]}}
    cdesc = {"mediaType": "application/vnd.oci.image.config.v1+json",
             **put(json.dumps(cfg, sort_keys=True).encode())}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": cdesc, "layers": [layer]}
    mdesc = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
             **put(json.dumps(manifest, sort_keys=True).encode()),
             "annotations": {"org.opencontainers.image.ref.name": tag}}
    index = {"schemaVersion": 2, "manifests": []}
    if (dest / "index.json").exists():
        index = json.loads((dest / "index.json").read_text())
    index["manifests"] = [m for m in index["manifests"]
                          if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag]
    index["manifests"].append(mdesc)
    (dest / "index.json").write_text(json.dumps(index))
    (dest / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return f"oci:{dest}:{tag}"


if __name__ == "__main__":  # pragma: no cover
    print(write_oci(sys.argv[1], *(sys.argv[2:3] or ["busybox"])))
