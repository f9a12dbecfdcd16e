"""Real containers/storage overlay stores built with podman, once per test session.

Layout (all under one pytest tmp dir, STORES.md section 6):
- `ais/`: an additional image store built with its own storage.conf:
  `localhost/base:latest` (`tar -C ROOTFS -c . | podman import -`, one layer) and
  `localhost/ais2:latest` (base + one RUN layer: an image whose top layer lives only in the AIS).
- `main/`: the primary store, configured with `additionalimagestores=[ais]`, where
  `podman build --isolation chroot` builds `localhost/app:latest` FROM base with RUN steps that delete
  files, replace a directory, change permissions and owners, add files, hardlinks and a device node,
  and rename a directory.  `localhost/step1:latest` tags the untagged intermediate image of the first
  RUN step.  The base layer lives only in the AIS.

Importable helpers (`build_podman_stores`, `cleanup_mounts`, `fingerprint`, `podman`) are used by the
session fixture `podman_stores` and by tests that need extra stores.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import require_root, require_tool

BUSYBOX_APPLETS = ("sh", "rm", "mkdir", "cp", "echo", "chmod", "chown", "ln", "touch", "cat", "ls",
                   "mv", "head", "mknod", "true", "test")

# Each RUN step is one layer of localhost/app.
APP_STEPS = (
    # layer 1: delete files (one of them a symlink), chmod a dir, add small and large files
    "rm /etc/small /opt/link && chmod 700 /usr/share/doc && echo added > /etc/added"
    " && head -c 500 /bin/busybox > /etc/bigadded",
    # layer 2: replace a directory (opaque dir), plus an empty file
    "rm -rf /opt/app && mkdir /opt/app && echo x > /opt/app/new && touch /opt/app/empty",
    # layer 3: copy-up with new owner and a hardlink to it, a real device node, a renamed directory,
    # a setuid bit
    "chown 1000:1000 /etc/big.txt && ln /etc/big.txt /etc/big.hard && mknod /etc/null c 1 3"
    " && mv /usr/share/doc /usr/share/doc2 && chmod 4755 /opt/app/new",
)
AIS2_STEP = "echo two > /etc/two && rm /etc/small"


@dataclass
class ImageInfo:
    """What podman itself says about an image (the independent reference for the tests)."""

    id: str
    names: list[str]
    diff_ids: list[str]            # RootFS.Layers, base first
    diff_dirs: list[str]           # GraphDriver UpperDir + LowerDir, reversed: base first


@dataclass
class PodmanStores:
    base: Path
    ais: Path                      # AIS graphroot
    main: Path                     # primary graphroot
    ais_conf: Path                 # storage.conf of the AIS alone
    main_conf: Path                # storage.conf of the primary (with the AIS)
    containers_conf: Path
    rootfs: Path
    images: dict[str, ImageInfo] = field(default_factory=dict)
    seconds: float = 0.0

    def env(self, conf: Path | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["CONTAINERS_STORAGE_CONF"] = str(conf or self.main_conf)
        env["CONTAINERS_CONF"] = str(self.containers_conf)
        return env


def podman(env: dict[str, str], *args: str, stdin: bytes | None = None, timeout: float = 120) -> str:
    """Run podman; on failure raise with its stderr (the only useful diagnostic)."""
    p = subprocess.run(["podman", *args], env=env, input=stdin, capture_output=True, timeout=timeout,
                       stdin=subprocess.DEVNULL if stdin is None else None)
    if p.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed ({p.returncode}):\n"
                           f"{p.stderr.decode(errors='replace')}")
    return p.stdout.decode()


def write_storage_conf(path: Path, graphroot: Path, runroot: Path, additional: list[Path] = ()) -> None:
    lines = ["[storage]", 'driver = "overlay"', f'graphroot = "{graphroot}"', f'runroot = "{runroot}"']
    if additional:
        lines += ["", "[storage.options]",
                  "additionalimagestores = [" + ", ".join(f'"{a}"' for a in additional) + "]"]
    path.write_text("\n".join(lines) + "\n")


def write_containers_conf(path: Path, base: Path) -> None:
    path.write_text(
        "[engine]\n"
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        f'tmp_dir = "{base / "libpod-tmp"}"\n'
        "\n[containers]\n"
        "default_ulimits = []\n"
    )


def build_rootfs(root: Path) -> None:
    """A small tree: busybox-static with applet symlinks, small and large files, a symlink, a hardlink."""
    busybox = shutil.which("busybox")
    assert busybox is not None
    for d in ("bin", "etc", "opt/app", "usr/share/doc", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    os.chmod(root / "bin" / "busybox", 0o755)
    for applet in BUSYBOX_APPLETS:
        os.symlink("busybox", root / "bin" / applet)
    (root / "etc" / "small").write_text("hello\n")
    (root / "etc" / "big.txt").write_bytes(bytes(range(256)) + b"\n" * 150)   # > 64 bytes
    (root / "opt" / "app" / "a").write_text("app one\n")
    (root / "opt" / "app" / "b").write_bytes(b"b" * 200)
    os.link(root / "opt" / "app" / "b", root / "opt" / "app" / "b.hard")
    os.symlink("../etc/small", root / "opt" / "link")
    (root / "usr" / "share" / "doc" / "readme").write_text("doc\n")
    os.chmod(root / "tmp", 0o1777)
    for p in sorted(root.rglob("*"), reverse=True):
        os.utime(p, ns=(1_600_000_000_000_000_000,) * 2, follow_symlinks=False)


def _inspect(env: dict[str, str], names: list[str]) -> dict[str, ImageInfo]:
    out: dict[str, ImageInfo] = {}
    for name, doc in zip(names, json.loads(podman(env, "image", "inspect", *names)), strict=True):
        data = doc["GraphDriver"]["Data"]
        dirs = [data["UpperDir"]] + ([d for d in data["LowerDir"].split(":") if d]
                                     if data.get("LowerDir") else [])
        out[name] = ImageInfo(id=doc["Id"], names=list(doc.get("RepoTags") or []),
                              diff_ids=list(doc["RootFS"]["Layers"]), diff_dirs=dirs[::-1])
    return out


def build_podman_stores(base: Path) -> PodmanStores:
    """Build the AIS, then the primary with the AIS configured (so base layers stay AIS-only)."""
    t0 = time.monotonic()
    s = PodmanStores(base=base, ais=base / "ais", main=base / "main", ais_conf=base / "storage-ais.conf",
                     main_conf=base / "storage-main.conf", containers_conf=base / "containers.conf",
                     rootfs=base / "rootfs")
    (base / "libpod-tmp").mkdir()
    write_storage_conf(s.ais_conf, s.ais, base / "ais-run")
    write_storage_conf(s.main_conf, s.main, base / "main-run", [s.ais])
    write_containers_conf(s.containers_conf, base)
    build_rootfs(s.rootfs)

    ais_env = s.env(s.ais_conf)
    tar = subprocess.run(["tar", "-C", str(s.rootfs), "-c", "."], capture_output=True, check=True)
    podman(ais_env, "import", "-", "localhost/base:latest", stdin=tar.stdout)
    _build(ais_env, base / "ctx-ais2", "localhost/ais2:latest", [AIS2_STEP])
    podman(ais_env, "image", "umount", "--all")

    env = s.env()
    _build(env, base / "ctx-app", "localhost/app:latest", list(APP_STEPS))
    # tag the untagged intermediate image of the first RUN step
    candidates = [d for d in json.loads(podman(env, "image", "inspect",
                                               *podman(env, "images", "-a", "-q", "--no-trunc").split()))
                  if not d.get("RepoTags") and len(d["RootFS"]["Layers"]) == 2]
    assert len(candidates) == 1, [d["Id"] for d in candidates]
    podman(env, "tag", candidates[0]["Id"], "localhost/step1:latest")
    podman(env, "image", "umount", "--all")
    s.images = _inspect(env, ["localhost/base:latest", "localhost/ais2:latest",
                              "localhost/app:latest", "localhost/step1:latest"])
    s.seconds = time.monotonic() - t0
    return s


def _build(env: dict[str, str], ctx: Path, tag: str, steps: list[str]) -> None:
    ctx.mkdir()
    (ctx / "Containerfile").write_text("FROM localhost/base:latest\n" +
                                       "".join(f"RUN {step}\n" for step in steps))
    podman(env, "build", "--isolation", "chroot", "-t", tag, str(ctx))


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path` (from /proc/self/mountinfo), deepest first."""
    prefix = os.path.realpath(path)
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == prefix or mp.startswith(prefix + "/"):
                points.append(mp)
    return sorted(points, key=len, reverse=True)


def cleanup_mounts(path: Path) -> None:
    """Unmount everything podman (or a test) left mounted below `path`."""
    for mp in mounts_under(path):
        subprocess.run(["umount", mp], capture_output=True)
    for mp in mounts_under(path):
        subprocess.run(["umount", "-l", mp], capture_output=True)
    left = mounts_under(path)
    assert not left, f"mounts left behind: {left}"


def fingerprint(root: Path) -> dict[str, tuple]:
    """Everything about a tree that a writer could change: type, mode, owner, size, mtime, ctime,
    xattrs and content (sha256) of every entry.  atime is left out (reading may update it)."""
    rootb = os.fsencode(root)
    out: dict[str, tuple] = {".": _entry(rootb, os.lstat(rootb))}
    for dirpath, dirnames, filenames in os.walk(rootb):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            out[os.fsdecode(os.path.relpath(p, rootb))] = _entry(p, os.lstat(p))
    return out


def _entry(p: bytes, st: os.stat_result) -> tuple:
    try:
        xattrs = tuple(sorted((n, os.getxattr(p, n, follow_symlinks=False))
                              for n in os.listxattr(p, follow_symlinks=False)))
    except OSError:
        xattrs = ()
    content = None
    if stat.S_ISREG(st.st_mode):
        with open(p, "rb") as f:
            content = hashlib.file_digest(f, "sha256").hexdigest()
    elif stat.S_ISLNK(st.st_mode):
        content = os.readlink(p)
    return (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_rdev, st.st_nlink, st.st_mtime_ns,
            st.st_ctime_ns, xattrs, content)


@pytest.fixture(scope="session")
def podman_stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodmanStores]:
    """The podman-built AIS + primary stores (built once; every mount undone at the end)."""
    require_root()
    require_tool("podman")
    require_tool("busybox")
    require_tool("tar")
    base = tmp_path_factory.mktemp("cstorage")
    try:
        stores = build_podman_stores(base)
        cleanup_mounts(base)
        yield stores
    finally:
        for conf in (base / "storage-main.conf", base / "storage-ais.conf"):
            if conf.exists() and shutil.which("podman"):
                subprocess.run(["podman", "image", "umount", "--all"], capture_output=True,
                               env={**os.environ, "CONTAINERS_STORAGE_CONF": str(conf),
                                    "CONTAINERS_CONF": str(base / "containers.conf")})
        cleanup_mounts(base)


def export_oci(s: PodmanStores, image: str, dest: Path) -> Path:
    """`podman save --format oci-dir`: the image as c/storage itself exports it (its layers rebuilt
    from c/storage's tar-split data, so their uncompressed digests are the diff_ids)."""
    if not dest.exists():
        podman(s.env(), "save", "--format", "oci-dir", "-o", str(dest), image)
    return dest


def exported_layers(s: PodmanStores) -> dict[str, Path]:
    """diff_id -> blob path of every layer of app and ais2, from podman's own OCI export (cached)."""
    out: dict[str, Path] = {}
    for image in ("localhost/app:latest", "localhost/ais2:latest"):
        d = export_oci(s, image, s.base / ("export-" + image.split("/")[1].replace(":", "-")))
        index = json.loads((d / "index.json").read_text())
        mdigest = index["manifests"][0]["digest"].split(":", 1)[1]
        manifest = json.loads((d / "blobs" / "sha256" / mdigest).read_text())
        config = json.loads((d / "blobs" / "sha256" / manifest["config"]["digest"].split(":", 1)[1]).read_text())
        for desc, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
            out[diff_id] = d / "blobs" / "sha256" / desc["digest"].split(":", 1)[1]
    return out
