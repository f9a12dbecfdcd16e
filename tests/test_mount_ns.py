"""Leases of mounts made in other mount namespaces (`unshare -m flatmount mount x`): live while that
namespace exists and has the mount, stale once it is gone (real `unshare`, real mounts, root)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

import pytest
from conftest import ROOT, require_root, require_tool
from test_mount import BIG, EXPECT, make_stores, open_primary, read_all, unmount_everything_below

from flatmount.errors import MountError
from flatmount.fsck import fsck
from flatmount.gc import gc
from flatmount.kernel import kmount, mntns
from flatmount.mount import cleanup, list_mounts, mount_image_ref, mounts_dir, umount
from flatmount.store.leases import read_leases
from objects.digest import fsverity_digest


@pytest.fixture
def stores(tmp_path):
    require_root()
    require_tool("unshare")
    require_tool("nsenter")
    paths = make_stores(tmp_path)
    procs: list[subprocess.Popen] = []
    paths["procs"] = procs
    try:
        yield paths
    finally:
        for p in procs:   # the namespaces die with them, and their mounts with the namespaces
            if p.poll() is None:
                p.kill()
            p.wait()
        for m in reversed(kmount.mounts()):
            if m.mountpoint.startswith(str(tmp_path) + "/") and m.fstype == "nsfs":
                kmount.umount_image(m.mountpoint, lazy=True)
        unmount_everything_below(str(tmp_path))


def flatmount_cmd(paths) -> str:
    return shlex.join([sys.executable, "-m", "flatmount", "--root", paths["root"], "--runroot", paths["run"],
                       "--additional-store", paths["ais"]])


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def wait_for_line(path, proc: subprocess.Popen, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().endswith("\n"):
            return path.read_text().strip()
        if proc.poll() is not None and not (path.exists() and path.read_text()):
            pytest.fail(f"the namespace's mount failed: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    pytest.fail("the mount in the other namespace did not finish")


def mount_in_new_namespace(paths, tmp_path, *, stay: bool = True, nsfile: str | None = None
                           ) -> tuple[subprocess.Popen, str]:
    """`unshare -m --propagation private sh -c 'flatmount mount app; sleep 1000'`: (process, merged)."""
    out = tmp_path / f"merged-{len(paths['procs'])}.txt"
    script = f"{flatmount_cmd(paths)} mount app > {shlex.quote(str(out))}"
    if stay:
        script += " && exec sleep 1000"
    ns = ["--mount=" + nsfile] if nsfile else ["-m"]
    proc = subprocess.Popen(["unshare", *ns, "--propagation", "private", "sh", "-c", script],
                            env=env(), cwd=str(ROOT), stderr=subprocess.PIPE, text=True)
    paths["procs"].append(proc)
    merged = wait_for_line(out, proc)
    if not stay:
        assert proc.wait(timeout=60) == 0
    return proc, merged


def in_ns(pid: int, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", "-t", str(pid), "-m", *cmd], capture_output=True, env=env(),
                          cwd=str(ROOT), timeout=60)


def object_path(store, data: bytes) -> str:
    h = fsverity_digest(data).hex()
    return os.path.join(store.objects_dir, h[:2], h[2:])


def test_mount_of_another_namespace_is_live_pinned_and_kept_until_that_namespace_is_gone(stores, tmp_path):
    proc, merged = mount_in_new_namespace(stores, tmp_path)
    store = open_primary(stores)
    (lease,) = list_mounts(store)
    assert lease.merged == merged and lease.mnt_ns and lease.mnt_ns != mntns.current_ns() and lease.mnt_id
    assert not kmount.is_mountpoint(merged)                         # invisible from here ...
    assert proc.pid in mntns.ns_pids(lease.mnt_ns)
    assert [j.stale_reason for j in read_leases(store.connect())] == [None]   # ... and still live
    # the image record goes: only the lease pins the top layer's objects now
    store.remove_image("app")
    mine = [object_path(store, b) for b in BIG[2:]]
    res = gc(store, grace_s=0)
    assert res.leases_live == 1 and res.leases_stale == 0
    assert all(os.path.exists(p) for p in mine)
    assert read_all(f"/proc/{proc.pid}/root{merged}") == EXPECT     # readable inside
    r = in_ns(proc.pid, "cat", os.path.join(merged, "app", "main"))
    assert r.returncode == 0 and r.stdout == BIG[2]
    assert "stale-lease" not in {p.kind for p in fsck(store).problems}
    res = cleanup(store)
    assert res.kept == (lease.id,) and res.removed_leases == () and os.path.isdir(merged)
    # from here it cannot be unmounted (an rmdir of its dir would even detach it there)
    with pytest.raises(MountError, match="another mount namespace.*nsenter"):
        umount(store, lease.id)
    assert [x.id for x in list_mounts(store)] == [lease.id] and os.path.isdir(merged)
    assert in_ns(proc.pid, "cat", os.path.join(merged, "app", "main")).stdout == BIG[2]
    # the namespace goes with its only process: now the lease is proven stale
    proc.kill()
    proc.wait()
    (judged,) = read_leases(store.connect())
    assert judged.stale_reason == mntns.GONE
    res = cleanup(store)
    assert res.removed_leases == (lease.id,) and list_mounts(store) == []
    assert not os.path.exists(os.path.dirname(merged))
    res = gc(store, grace_s=0)
    assert not any(os.path.exists(p) for p in mine)


def test_unmounted_inside_its_live_namespace_is_stale(stores, tmp_path):
    proc, merged = mount_in_new_namespace(stores, tmp_path)
    store = open_primary(stores)
    (lease,) = list_mounts(store)
    inode_only = lease.mnt_ns.split("/")[0]
    # the kernel's answer (statmount by ids) and the /proc answer (mountinfo of a process in it)
    assert mntns.ns_stale_reason(merged, lease.mnt_ns, lease.mnt_id) is None
    assert mntns.ns_stale_reason(merged, inode_only) is None
    r = in_ns(proc.pid, "umount", merged)                           # not through flatmount
    assert r.returncode == 0, r.stderr
    assert proc.poll() is None
    assert mntns.ns_stale_reason(merged, lease.mnt_ns, lease.mnt_id) == mntns.NOT_MOUNTED
    assert mntns.ns_stale_reason(merged, inode_only) == mntns.NOT_MOUNTED
    assert cleanup(store).removed_leases == (lease.id,)
    assert os.listdir(mounts_dir(store)) == []


def test_umount_inside_the_namespace_works(stores, tmp_path):
    proc, merged = mount_in_new_namespace(stores, tmp_path)
    r = in_ns(proc.pid, *shlex.split(flatmount_cmd(stores)), "umount", merged)
    assert r.returncode == 0, r.stderr
    store = open_primary(stores)
    assert list_mounts(store) == [] and os.listdir(mounts_dir(store)) == []


def test_namespace_kept_by_a_bind_mounted_nsfs_file_outlives_its_process(stores, tmp_path):
    """`unshare --mount=FILE`: the mounting process exits, the namespace (and its mount) live on."""
    nsdir = tmp_path / "ns"
    nsdir.mkdir()
    subprocess.run(["mount", "--bind", str(nsdir), str(nsdir)], check=True)
    subprocess.run(["mount", "--make-private", str(nsdir)], check=True)
    nsfile = nsdir / "mnt"
    nsfile.touch()
    _proc, merged = mount_in_new_namespace(stores, tmp_path, stay=False, nsfile=str(nsfile))
    store = open_primary(stores)
    (lease,) = list_mounts(store)
    assert mntns.ns_pids(lease.mnt_ns) == []                        # no process left in it
    assert mntns._Scan(lease.mnt_ns).held()                         # /proc: the nsfs bind mount holds it
    assert [j.stale_reason for j in read_leases(store.connect())] == [None]
    assert cleanup(store).kept == (lease.id,)
    r = subprocess.run(["nsenter", f"--mount={nsfile}", "cat", os.path.join(merged, "app", "main")],
                       capture_output=True, timeout=60)
    assert r.returncode == 0 and r.stdout == BIG[2]
    fd = os.open(nsfile, os.O_RDONLY)                               # an open fd holds it too
    try:
        kmount.umount_image(str(nsfile), lazy=True)                 # busy while the fd is open
        assert mntns._Scan(lease.mnt_ns).held()
        assert [j.stale_reason for j in read_leases(store.connect())] == [None]
        assert cleanup(store).kept == (lease.id,)
    finally:
        os.close(fd)                                                # the last holder goes
    assert not mntns._Scan(lease.mnt_ns).held()
    assert cleanup(store).removed_leases == (lease.id,)


def test_leases_of_a_db_from_before_namespaces_keep_the_old_rule(stores):
    store = open_primary(stores)
    db = store.connect()
    if {"mnt_ns", "mnt_id"} & {r[1] for r in db.execute("PRAGMA table_info(leases)")}:
        db.execute("ALTER TABLE leases DROP COLUMN mnt_ns")
        db.execute("ALTER TABLE leases DROP COLUMN mnt_id")
    old = os.path.join(mounts_dir(store), "old", "merged")
    os.makedirs(old)
    with store.transaction() as tx:
        tx.execute("INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?, ?)",
                   ("old", "0" * 64, "app", old, 1, None, time.time()))
    (lease,) = list_mounts(store)
    assert lease.mnt_ns is None
    live = mount_image_ref(store, "app")                           # adds the columns
    try:
        assert live.mnt_ns == mntns.current_ns() and live.mnt_id == kmount.mount_id(live.merged)
        judged = {j.id: j.stale_reason for j in read_leases(store.connect())}
        assert judged == {"old": "merged dir is not mounted", live.id: None}
        assert cleanup(store).removed_leases == ("old",)
    finally:
        umount(store, live.id)
