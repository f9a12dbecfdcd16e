"""Audit: `flatmount bundle DIR`, `runc run -b DIR` (a container flatmount does not track), then
`bundle --remove DIR` or `umount` of its merged dir while that container runs.  The container's own
mount namespace keeps the overlay (or the bundle's stubs overlay over it) alive; releasing the lease
would let gc delete objects it still reads.  Refused (exit 3) unless --force, which keeps the lease,
detached, while the container shows the mount.  Real store, real mounts, real runc.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, require_root, require_tool

from flatmount.api import open_store
from flatmount.kernel import holders
from tools.busybox_image import write_oci

BB = "/bin/busybox"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    require_root()
    require_tool("runc")
    base = tmp_path_factory.mktemp("bundlerunc")
    paths = {"root": str(base / "store"), "runroot": str(base / "run"), "base": str(base)}
    with open_store(paths["root"], runroot=paths["runroot"]) as store:
        store.pull(write_oci(base / "oci", "bb", {"Cmd": ["sh"], "Env": ["PATH=/bin"]}), "bb")
        store.pull(f"oci:{ROOT}/flatmount/examples/demo-oci:demo", "demo")
    try:
        yield paths
    finally:
        left = [line.split(" ")[4] for line in open("/proc/self/mountinfo")
                if line.split(" ")[4].startswith(str(base))]
        for m in reversed(left):
            subprocess.run(["umount", "-l", m], check=False)
        assert not left, f"mounts left behind: {left}"


def _cli(paths, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flatmount", "--root", paths["root"], "--runroot",
                           paths["runroot"], *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT))


def _leases(paths):
    with open_store(paths["root"], runroot=paths["runroot"]) as store:
        return store.mounts()


@pytest.mark.parametrize("image,extra", [("bb", ()), ("demo", ("-v", f"{BB}:{BB}:ro"))],
                         ids=["plain", "stubs"])
@pytest.mark.parametrize("how", ["remove", "umount"])
def test_untracked_runc_container_keeps_its_bundle_leased(env, tmp_path, image, extra, how):
    d = tmp_path / "b"
    rroot = str(tmp_path / "runc")
    cid = f"untracked-{image}-{how}"
    before = {x.id for x in _leases(env)}
    lease = None
    r = _cli(env, "bundle", "-u", "0", *extra, image, str(d), "--", BB, "sleep", "600")
    assert r.returncode == 0, r.stderr
    try:
        [lease] = [x for x in _leases(env) if x.id not in before]
        with open(tmp_path / "runc.err", "w") as err:   # not a pipe: the container keeps it open
            p = subprocess.run(["runc", "--root", rroot, "run", "-d", "-b", str(d), cid],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                               timeout=60)
        assert p.returncode == 0, (tmp_path / "runc.err").read_text()
        state = subprocess.run(["runc", "--root", rroot, "state", cid], capture_output=True,
                               text=True, timeout=60, check=True).stdout
        pid = json.loads(state)["pid"]
        cmd = (("bundle", "--remove", str(d)) if how == "remove" else ("umount", lease.merged))
        r = _cli(env, *cmd)
        assert r.returncode == 3 and r.stderr.count("\n") == 1, r.stderr
        assert "stop that container first, or use --force" in r.stderr and "pid " in r.stderr
        assert os.path.ismount(lease.merged) and lease.id in {x.id for x in _leases(env)}
        r = _cli(env, cmd[0], "--force", *cmd[1:])
        assert r.returncode == 0, r.stderr
        assert not os.path.ismount(lease.merged)
        # the lease stays, live, while the container still shows the mount; cleanup keeps it
        [kept] = [x for x in _leases(env) if x.id not in before]
        assert kept.id == lease.id and kept.live and kept.detached_sb, kept
        assert _cli(env, "cleanup").returncode == 0
        assert lease.id in {x.id for x in _leases(env)}
        # the container still reads its image (through its own copy of the mount)
        with open(f"/proc/{pid}/root{BB}", "rb") as f:
            assert f.read(4) == b"\x7fELF"
        # once the container is gone, no mount namespace shows the superblock any more (the lease
        # then goes with cleanup where every process can be looked into: flatmount.kernel.holders)
        subprocess.run(["runc", "--root", rroot, "delete", "--force", cid], check=True, timeout=60)
        for _ in range(100):
            if holders._mounted_anywhere(kept.detached_sb, holders._pids()) is False:
                break
            time.sleep(0.2)
        assert holders._mounted_anywhere(kept.detached_sb, holders._pids()) is False
    finally:
        subprocess.run(["runc", "--root", rroot, "delete", "--force", cid], capture_output=True,
                       timeout=60)
        if d.exists():
            _cli(env, "bundle", "--force", "--remove", str(d))
        _cli(env, "cleanup")
        for m in (d / "rootfs", Path(lease.merged) if lease else None):   # whatever still is mounted
            if m is not None and os.path.ismount(m):
                subprocess.run(["umount", "-l", str(m)], check=False)
