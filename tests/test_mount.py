"""Store-level mounts: private merged dirs, leases, cleanup after crashes (real kernel mounts, root)."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, require_root, require_tool
from layerdirs import file_tree, store_image

from flatmount.api import open_store
from flatmount.errors import CorruptImageError, MountError, NotFoundError, StoreError
from flatmount.flatten import flatten_image
from flatmount.kernel import kmount
from flatmount.mount import (
    boot_id,
    cleanup,
    list_mounts,
    mount,
    mount_image_ref,
    mounts_dir,
    umount,
)

BIG = [bytes([65 + i]) * (3000 + i) for i in range(4)]
BASE = [
    {"etc/os-release": b"ID=base", "usr/lib/libbig.so": BIG[0], "var/lib/state": b"old"},
    {"usr/bin/tool": BIG[1], "var/lib/state": b"<whiteout>"},
]
TOP = {"etc/os-release": b"ID=app", "app/main": BIG[2], "app/data/x": BIG[3]}
EXPECT = {"etc/os-release": b"ID=app", "usr/lib/libbig.so": BIG[0], "usr/bin/tool": BIG[1],
          "app/main": BIG[2], "app/data/x": BIG[3]}


def read_all(merged: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(merged):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, merged)] = fh.read()
    return out


def make_stores(tmp_path) -> dict[str, str]:
    """An additional store holding the base chain (image `base`) and a primary whose image `app`
    adds one layer on top of it.  Returns the paths."""
    paths = {"ais": str(tmp_path / "ais"), "root": str(tmp_path / "primary"), "run": str(tmp_path / "run")}
    ais = open_store(paths["ais"], runroot=paths["run"])
    ids = store_image(ais, [file_tree(f, mtime_ns=(i + 1) * 10**18) for i, f in enumerate(BASE)], "base",
                      blobs=BIG[:2])
    ais.close()
    p = open_store(paths["root"], additional=[paths["ais"]], runroot=paths["run"])
    store_image(p, [file_tree(TOP, mtime_ns=3 * 10**18)], "app", parent=ids[-1], blobs=BIG[2:])
    p.close()
    return paths


def open_primary(paths):
    return open_store(paths["root"], additional=[paths["ais"]], runroot=paths["run"])


def unmount_everything_below(path: str) -> None:
    for m in reversed(kmount.mounts()):
        if m.mountpoint.startswith(path + "/"):
            kmount.umount_image(m.mountpoint, lazy=True)


@pytest.fixture
def stores(tmp_path):
    require_root()
    paths = make_stores(tmp_path)
    try:
        yield paths
    finally:
        unmount_everything_below(str(tmp_path))


def check_consistent(store) -> None:
    """No lease without its mount, no mount or dir under <runroot>/mounts without a lease."""
    leases = list_mounts(store)
    leased = {lease.merged for lease in leases}
    for lease in leases:
        assert kmount.is_mountpoint(lease.merged), f"lease {lease.id} without a mount"
    base = mounts_dir(store)
    for name in os.listdir(base) if os.path.isdir(base) else []:
        assert os.path.join(base, name, "merged") in leased, f"dir {name} without a lease"
    for m in kmount.mounts():
        if m.mountpoint.startswith(base + "/"):
            assert m.mountpoint in leased, f"mount {m.mountpoint} without a lease"


# --- mounting -------------------------------------------------------------------------------------

def test_mount_reads_the_flattened_chain_and_leaves_nothing(stores):
    store = open_primary(stores)
    with mount(store, "app") as merged:
        assert read_all(merged) == EXPECT
        top = os.path.dirname(merged)
        assert os.path.dirname(top) == mounts_dir(store) and os.path.basename(merged) == "merged"
        for d in (top, mounts_dir(store)):
            assert os.stat(d).st_mode & 0o777 == 0o700
        assert kmount.is_mountpoint(merged)
        (lease,) = list_mounts(store)
        assert lease.merged == merged and lease.image_ref == "app" and lease.pid == os.getpid()
        assert lease.boot_id == boot_id() and lease.image_digest == flatten_image(store, "app").digest
        with pytest.raises(OSError):
            open(os.path.join(merged, "new"), "w").close()  # read-only
    assert list_mounts(store) == [] and os.listdir(mounts_dir(store)) == []
    assert not os.path.exists(merged) and not os.path.exists(top)


def test_each_mount_is_private(stores):
    store = open_primary(stores)
    a = mount_image_ref(store, "app")
    b = mount_image_ref(store, "app")
    try:
        assert a.merged != b.merged and a.id != b.id
        assert {m.id for m in list_mounts(store)} == {a.id, b.id}
        assert umount(store, a.merged).id == a.id       # by merged path
        assert read_all(b.merged) == EXPECT             # the other one is untouched
    finally:
        umount(store, b.id)                             # by lease id
    assert list_mounts(store) == []
    with pytest.raises(NotFoundError):
        umount(store, b.id)


def test_mount_of_additional_store_image_locks_and_writes_nothing_there(stores, tmp_path):
    """The additional store is mounted read-only: mounting its image works, nothing is written or
    locked there, and while mounted this process holds no lock at all."""
    ro = str(tmp_path / "ais-ro")
    os.mkdir(ro)
    subprocess.run(["mount", "--bind", stores["ais"], ro], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", ro], check=True)
        ais_view = open_store(ro, runroot=stores["run"], readonly=True)
        store = open_store(stores["root"], additional=[ro], runroot=stores["run"])
        lease = mount_image_ref(store, "base")
        try:
            got = read_all(lease.merged)
            assert got["etc/os-release"] == b"ID=base" and got["usr/bin/tool"] == BIG[1]
            assert "var/lib/state" not in got
            ais_inodes = {os.stat(os.path.join(d, f)).st_ino for d, _, fs in os.walk(ro) for f in fs}
            with open("/proc/locks") as f:
                mine = [line.split() for line in f if f" {os.getpid()} " in line]
            # sqlite's shared WAL read locks on the primary's DB are fine; nothing else is held
            assert [lk for lk in mine if lk[1] == "FLOCK" or lk[3] != "READ"] == []
            assert [lk for lk in mine if int(lk[5].rsplit(":", 1)[1]) in ais_inodes] == []
        finally:
            umount(store, lease.id)
        assert ais_view.images()[0].names == ("base:latest",)
    finally:
        store.close()
        ais_view.close()
        subprocess.run(["umount", ro], check=True)


def test_errors_leave_no_lease_and_no_dir(stores, tmp_path):
    store = open_primary(stores)
    with pytest.raises(NotFoundError):
        mount_image_ref(store, "no-such-image")
    # a damaged cached image: found by its digest before the kernel sees it (flatmount.store.integrity)
    flat = flatten_image(store, "app")
    with open(flat.path, "r+b") as f:
        f.write(b"\0" * 4096)
    with pytest.raises(CorruptImageError, match="damaged"):
        mount_image_ref(store, "app")
    assert list_mounts(store) == [] and not os.path.exists(mounts_dir(store))  # (refused before any dir)
    # the kernel refusing: a cached "image" that matches its name but is no EROFS image
    junk = b"\0" * 8192
    digest = hashlib.sha256(junk).hexdigest()
    with open(os.path.join(os.path.dirname(flat.path), digest + ".erofs"), "wb") as f:
        f.write(junk)
    with store.transaction() as db:
        db.execute("UPDATE flat_images SET digest = ? WHERE chain_key = ?", (digest, flat.chain_key))
    with pytest.raises(MountError) as e:
        mount_image_ref(store, "app")
    assert e.value.errno is not None
    assert list_mounts(store) == [] and os.listdir(mounts_dir(store)) == []
    with store.transaction() as db:
        db.execute("DELETE FROM flat_images WHERE chain_key = ?", (flat.chain_key,))
    os.unlink(flat.path)  # rebuilt on the next use
    # a missing object dir of an involved additional store
    os.rename(os.path.join(stores["ais"], "objects"), str(tmp_path / "moved"))
    try:
        with pytest.raises(StoreError, match="object directory"):
            mount_image_ref(store, "app")
    finally:
        os.rename(str(tmp_path / "moved"), os.path.join(stores["ais"], "objects"))
    assert list_mounts(store) == [] and os.listdir(mounts_dir(store)) == []
    with mount(store, "app") as merged:
        assert read_all(merged) == EXPECT


def cli(paths, *args: str, caps_drop: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "flatmount", "--root", paths["root"], "--runroot", paths["run"],
           "--additional-store", paths["ais"], *args]
    if caps_drop:
        cmd = ["setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), timeout=60)


def test_without_cap_sys_admin_is_a_permission_error(stores):
    require_tool("setpriv")
    r = cli(stores, "mount", "app", caps_drop=True)
    assert r.returncode == 3 and "PermissionRequiredError" in r.stderr, r.stderr
    assert list_mounts(open_primary(stores)) == []
    assert not os.path.exists(mounts_dir(open_primary(stores)))  # refused before anything was made


def test_cli_mount_mounts_umount_cleanup_flatten(stores):
    r = cli(stores, "mount", "app")
    assert r.returncode == 0, r.stderr
    merged = r.stdout.strip()
    try:
        assert read_all(merged) == EXPECT
        r = cli(stores, "mounts", "--json")
        (lease,) = json.loads(r.stdout)
        assert lease["merged"] == merged and lease["image_ref"] == "app"
        r = cli(stores, "mounts")
        assert lease["id"] in r.stdout and merged in r.stdout
        r = cli(stores, "cleanup", "--json")
        assert json.loads(r.stdout)["kept"] == [lease["id"]]
        r = cli(stores, "flatten", "app", "--json")
        flat = json.loads(r.stdout)
        assert flat["digest"] == lease["image_digest"] and flat["reused"] is True
        assert cli(stores, "flatten", "app").stdout.split() == [flat["digest"], flat["path"]]
    finally:
        r = cli(stores, "umount", merged)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(merged)
    assert json.loads(cli(stores, "mounts", "--json").stdout) == []
    r = cli(stores, "mount", "nope")
    assert r.returncode == 3 and "NotFoundError" in r.stderr and "Traceback" not in r.stderr
    r = cli(stores, "umount", "/nowhere/merged")
    assert r.returncode == 3 and "NotFoundError" in r.stderr


HEAVY = ("flatmount.image.writer", "flatmount.image.reader", "flatmount.pull", "flatmount.sources.layers",
         "zstandard", "tarfile", "sqlite3.dump", "hypothesis")


def test_cli_mount_imports_nothing_heavy(stores):
    cli(stores, "flatten", "app")  # cached image: mounting must not need the writer or reader
    cmd = [sys.executable, "-X", "importtime", "-m", "flatmount", "--root", stores["root"], "--runroot",
           stores["run"], "--additional-store", stores["ais"], "mount", "app"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), timeout=60)
    assert r.returncode == 0, r.stderr
    merged = r.stdout.strip()
    try:
        imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if "|" in line}
        assert imported & set(HEAVY) == set()
    finally:
        umount(open_primary(stores), merged)


# --- cleanup --------------------------------------------------------------------------------------

def insert_lease(store, lease_id: str, merged: str, boot: str) -> None:
    with store.transaction() as db:
        db.execute("INSERT INTO leases(id, image_digest, image_ref, merged, pid, boot_id, created) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)", (lease_id, "0" * 64, "app", merged, 1, boot, time.time()))


def test_cleanup_repairs_every_crash_state_and_keeps_live_mounts(stores):
    import fcntl

    store = open_primary(stores)
    live = mount_image_ref(store, "app")
    base = mounts_dir(store)

    def dirs(name: str) -> str:
        os.makedirs(os.path.join(base, name, "merged"))
        return os.path.join(base, name, "merged")

    insert_lease(store, "stale", dirs("stale"), boot_id())           # lease, dirs, no mount
    insert_lease(store, "noboot", dirs("noboot"), "another-boot")     # lease from another boot
    insert_lease(store, "nodirs", os.path.join(base, "nodirs", "merged"), boot_id())  # lease only
    leftover = dirs("leftover")                                       # dirs, no lease
    orphan = dirs("orphan")                                           # a mount nobody leased
    kmount.mount_image(flatten_image(store, "app").path, orphan, store.object_dirs())
    busy = dirs("busy")                                               # someone mounting right now
    fd = os.open(os.path.dirname(busy), os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    nonempty = dirs("nonempty")                                       # not ours: rmdir only
    open(os.path.join(nonempty, "file"), "w").close()
    try:
        res = cleanup(store)
        assert set(res.removed_leases) == {"stale", "noboot", "nodirs"}
        assert res.kept == (live.id,) and res.unmounted == (orphan,)
        assert res.busy == (os.path.dirname(busy),)
        assert {lease.id for lease in list_mounts(store)} == {live.id}
        assert sorted(os.listdir(base)) == sorted([live.id, "busy", "nonempty"])
        assert kmount.is_mountpoint(live.merged) and read_all(live.merged) == EXPECT
        assert not os.path.exists(leftover)
    finally:
        os.close(fd)
        umount(store, live.id)
    res = cleanup(store)
    assert os.listdir(base) == ["nonempty"] and os.path.dirname(busy) in res.removed_dirs
    assert os.path.exists(os.path.join(nonempty, "file"))


# --- kill -9 at random points of mount and unmount -------------------------------------------------

CHILD = r"""
import os, random, sys
sys.path.insert(0, {root!r})
from flatmount.mount import mount_image_ref, umount
from flatmount.api import open_store
s = open_store({primary!r}, additional=[{ais!r}], runroot={run!r})
print("ready", flush=True)
while True:
    lease = mount_image_ref(s, "app")
    umount(s, lease.id)
"""


def kill_trials(paths, trials: int, seed: int = 0) -> collections.Counter:
    """Start a process looping mount/unmount, kill -9 it after a random delay, repair, check."""
    rng = random.Random(seed)
    store = open_primary(paths)
    store_check = collections.Counter()
    script = CHILD.format(root=str(ROOT), primary=paths["root"], ais=paths["ais"], run=paths["run"])
    flatten_image(store, "app")
    for _ in range(trials):
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0, 0.03))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        # classify what the kill left, then repair
        leases = list_mounts(store)
        mounted = [lease for lease in leases if kmount.is_mountpoint(lease.merged)]
        store_check["leases_without_mount"] += len(leases) - len(mounted)
        store_check["complete_mounts"] += len(mounted)
        leased_tops = {os.path.dirname(lease.merged) for lease in leases}
        store_check["dirs_without_lease"] += len(
            [n for n in _listdir(mounts_dir(store)) if os.path.join(mounts_dir(store), n) not in leased_tops])
        cleanup(store)
        check_consistent(store)
        for lease in list_mounts(store):   # complete mounts survive cleanup; their owner is gone
            umount(store, lease.id)
        assert _listdir(mounts_dir(store)) == []
    return store_check


def _listdir(path: str) -> list[str]:
    """Entries of `path`; none when a child was killed before it ever made the mounts dir."""
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def test_kill9_during_mount_and_unmount_then_cleanup(stores):
    trials = int(os.environ.get("FLATMOUNT_KILL_TRIALS", "20"))
    stats = kill_trials(stores, trials)
    print(f"kill -9 trials: {trials}, states left behind: {dict(stats)}")
