"""Audit of issue 13 item 2 against containers: `unshare -m flatmount run -d IMAGE`.

The lease records the mount namespace of `unshare`, which is gone once `run -d` returns; the
container goes on reading the image through its own copy of the mount.  Before the fix, `cleanup`
judged the lease stale ("its mount namespace no longer exists") and `gc` then deleted the objects
the running container read.  Real store, real runc, real namespaces; the CLI in subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT, require_root, require_tool

BUSYBOX = "/bin/busybox" if os.path.isfile("/bin/busybox") else "/usr/bin/busybox"
READ_ALL = ("n=0; t=0; for f in $(/bin/busybox find / -xdev -type f); do t=$((t+1)); "
            "/bin/busybox cat $f >/dev/null 2>&1 || n=$((n+1)); done; echo $n $t")


def _mounts_under(prefix: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split(" ")[4] for line in f if line.split(" ")[4].startswith(prefix)]


def test_detached_container_from_another_namespace_keeps_its_objects(tmp_path):
    require_root()
    require_tool("runc")
    require_tool("unshare")
    require_tool("nsenter")
    base = [sys.executable, "-m", "flatmount", "--root", str(tmp_path / "store"), "--runroot",
            str(tmp_path / "run")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def fm(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        r = subprocess.run([*prefix, *base, *args], capture_output=True, text=True, timeout=120,
                           env=env, cwd=str(ROOT))
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r

    cid = None
    try:
        fm("pull", f"oci:{ROOT}/flatmount/examples/demo-oci:demo", "--name", "demo")
        cid = fm("run", "-d", "-v", f"{BUSYBOX}:/bin/busybox:ro", "demo", "--", "/bin/busybox", "sleep",
                 "300", prefix=("unshare", "-m", "--propagation", "private")).stdout.strip()
        pid = json.loads(fm("ps", "--json").stdout)[0]["pid"]
        fm("rmi", "demo")
        fm("cleanup")
        fm("gc", "--grace", "0")
        leases = json.loads(fm("mounts", "--json").stdout)
        assert len(leases) == 1 and not leases[0].get("stale_reason"), leases
        fsck = subprocess.run([*base, "fsck"], capture_output=True, text=True, env=env, cwd=str(ROOT))
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        _assert_reads_all(pid)
        fm("stop", "-t", "1", cid)
        fm("rm", cid)
        cid = None
        assert json.loads(fm("mounts", "--json").stdout) == []
        assert _mounts_under(str(tmp_path)) == []
    finally:
        if cid is not None:
            subprocess.run(["runc", "--root", str(tmp_path / "run" / "runc"), "delete", "--force", cid],
                           check=False, capture_output=True)
        for m in reversed(_mounts_under(str(tmp_path))):
            subprocess.run(["umount", "-l", m], check=False)


def test_umount_refuses_the_root_of_a_running_container(tmp_path):
    """`flatmount umount MERGED` of a `run -d` container's mount released its lease while the
    container read the image through its own namespace's copy; after `rmi` gc deleted its files."""
    require_root()
    require_tool("runc")
    base = [sys.executable, "-m", "flatmount", "--root", str(tmp_path / "store"), "--runroot",
            str(tmp_path / "run")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def fm(*args: str, rc: int = 0) -> subprocess.CompletedProcess:
        r = subprocess.run([*base, *args], capture_output=True, text=True, timeout=120, env=env,
                           cwd=str(ROOT))
        assert r.returncode == rc, (args, r.stdout, r.stderr)
        return r

    cid = None
    try:
        fm("pull", f"oci:{ROOT}/flatmount/examples/demo-oci:demo", "--name", "demo")
        cid = fm("run", "-d", "-v", f"{BUSYBOX}:/bin/busybox:ro", "demo", "--", "/bin/busybox", "sleep",
                 "300").stdout.strip()
        (lease,) = json.loads(fm("mounts", "--json").stdout)
        for args in (["umount", lease["merged"]], ["umount", "--lazy", lease["id"]]):
            r = fm(*args, rc=3)
            assert f"root of running container {cid}" in r.stderr and r.stderr.count("\n") == 1
        assert os.path.ismount(lease["merged"])
        fm("rmi", "demo")
        fm("gc", "--grace", "0")
        pid = json.loads(fm("ps", "--json").stdout)[0]["pid"]
        _assert_reads_all(pid)
        fm("stop", "-t", "1", cid)
        fm("rm", cid)
        cid = None
        assert json.loads(fm("mounts", "--json").stdout) == []
    finally:
        if cid is not None:
            subprocess.run([*base, "rm", "-f", cid], capture_output=True, env=env, cwd=str(ROOT))
        for m in reversed(_mounts_under(str(tmp_path))):
            subprocess.run(["umount", "-l", m], check=False)


def _assert_reads_all(pid: int) -> None:
    """Every file of the image reads back inside the container's mount namespace (pid's)."""
    r = subprocess.run(["nsenter", "-t", str(pid), "-m", "/bin/busybox", "sh", "-c", READ_ALL],
                       capture_output=True, text=True, timeout=60)
    bad, total = map(int, r.stdout.split())
    assert total > 10 and bad == 0, f"{bad} of {total} files unreadable in the container"
