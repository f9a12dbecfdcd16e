"""End to end: podman-built c/storage images -> `pull_cstorage` -> `store.mount` (EROFS under overlay).

The reference is always the kernel looking at c/storage's own diff dirs: `podman image mount`, or, where
podman cannot mount (an image whose top layer lives only in an additional image store), a hand-made
read-only overlay of the diff dirs.  Trees are compared with `scan_directory` (contents hashed, every
attribute and xattr) and with their composefs dumps (nlink and hardlink identity).

Root directory: flatten.py's root rule takes the root's attributes from the topmost layer whose root
carries any; a c/storage `diff/` root always does (0555, the diff dir's own mtime), which is exactly
the kernel overlay's rule.  So the roots are compared like every other entry, and also separately, to
show which attributes they have.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import cstorage_fixtures
import pytest
from conftest import require_tool
from cstorage_fixtures import PodmanStores, cleanup_mounts, fingerprint, podman

from flatmount.api import open_store
from flatmount.image.dump import dump_bytes
from flatmount.image.tree import Inode, lookup, walk
from flatmount.sources.cstorage import pull_cstorage
from flatmount.sources.directory import scan_directory
from flatmount.store.core import Store

podman_stores = cstorage_fixtures.podman_stores   # the session fixture, requested by name below

APP = "localhost/app:latest"      # base layer only in the c/storage AIS, three layers in the primary
AIS2 = "localhost/ais2:latest"    # both layers (top included) only in the c/storage AIS
BASE = "localhost/base:latest"


# --- helpers ----------------------------------------------------------------------------------------

def _overlay_erofs_mounts() -> set[str]:
    """The overlay and erofs lines of /proc/self/mountinfo (each line starts with its unique mount id)."""
    with open("/proc/self/mountinfo") as f:
        return {line.rstrip("\n") for line in f
                if line.partition(" - ")[2].split(" ")[0] in ("overlay", "erofs")}


def _new_mounts(before: set[str], *roots: Path) -> list[str]:
    """overlay/erofs entries added since `before` that name one of `roots` (mountpoint, source or
    options): ours or podman's.  Other processes' mounts elsewhere are not our business."""
    keys = [os.path.realpath(r) for r in roots]
    return sorted(line for line in _overlay_erofs_mounts() - before if any(k in line for k in keys))


def _mount_entry(mountpoint: str) -> tuple[str, str]:
    """(fstype, super options) of the mount at `mountpoint`, from /proc/self/mountinfo."""
    target = os.path.realpath(mountpoint)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            if left.split(" ")[4] == target:
                fstype, _source, options = right.split(" ", 2)
                found = (fstype, options)
    assert found is not None, f"nothing mounted at {mountpoint}"
    return found


def _root_attrs(t: Inode) -> tuple:
    return (stat.filemode(t.mode), t.uid, t.gid, t.mtime_ns, dict(t.xattrs))


def _assert_same_view(ours: Inode, reference: Inode) -> None:
    """Equal trees (content, attributes, xattrs), root included, and equal dumps (nlink, hardlinks)."""
    assert _root_attrs(ours) == _root_attrs(reference)
    assert ours == reference
    assert dump_bytes(ours) == dump_bytes(reference)
    files = [n for _, n in walk(ours) if n.is_reg and n.digest is not None]
    assert files, "no file large enough to be hashed: the content comparison would be empty"


def _assert_cstorage_root(tree: Inode, top_diff_dir: str) -> None:
    """The root the rule gives for c/storage layers: the top layer's diff/ dir, not the 0755/mtime-0
    default an importer gives a tar without `./`."""
    st = os.lstat(top_diff_dir)
    assert _root_attrs(tree) == (stat.filemode(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, {})
    assert stat.S_IMODE(tree.mode) == 0o555 and tree.mtime_ns != 0


def _podman_mount(s: PodmanStores, image: str) -> str:
    return podman(s.env(), "image", "mount", image).strip()


def _podman_umount(s: PodmanStores, image: str) -> None:
    podman(s.env(), "image", "umount", image)


def _new_store(tmp_path: Path, name: str, additional: list[Path] | None = None) -> Store:
    return open_store(tmp_path / name, additional=additional, runroot=tmp_path / f"run-{name}")


@pytest.fixture
def mount_guard(podman_stores, tmp_path):
    """Safety net: whatever a failing test left mounted (ours or podman's) is unmounted afterwards.
    The tests themselves assert that nothing was left."""
    yield _overlay_erofs_mounts()
    subprocess.run(["podman", "image", "umount", "--all"], env=podman_stores.env(), capture_output=True)
    cleanup_mounts(tmp_path)
    cleanup_mounts(podman_stores.base)


# --- 1. pull + mount == podman image mount ----------------------------------------------------------

def test_pulled_mount_equals_podman_mount(podman_stores, tmp_path, mount_guard):
    s = podman_stores
    info = s.images[APP]
    # precondition: the image's layers are split between the c/storage primary and its AIS
    assert info.diff_dirs[0].startswith(f"{s.ais}/") and all(d.startswith(f"{s.main}/")
                                                             for d in info.diff_dirs[1:])
    before = mount_guard
    t0 = time.monotonic()
    store = _new_store(tmp_path, "store")
    rec = pull_cstorage(store, f"containers-storage:{APP}", storage_conf=s.main_conf)
    assert rec.id == info.id
    assert [lay.diff_id for lay in store.layer_chain(rec.top_layer)] == info.diff_ids
    pulled = time.monotonic() - t0

    with store.mount(APP) as merged:
        fstype, options = _mount_entry(merged)
        assert fstype == "overlay" and "ro" in options.split(",")
        assert [lease.merged for lease in store.mounts()] == [merged]
        ours = scan_directory(merged)
    assert store.mounts() == [] and not os.path.exists(merged)

    pm = _podman_mount(s, APP)
    try:
        theirs = scan_directory(pm)
    finally:
        _podman_umount(s, APP)
    store.close()

    _assert_same_view(ours, theirs)
    _assert_cstorage_root(ours, info.diff_dirs[-1])
    # the view is the interesting one: deletions, an opaque dir, copy-ups, hardlinks, a device
    assert lookup(ours, "etc/small") is None and lookup(ours, "opt/link") is None
    assert set(lookup(ours, "opt/app").entries) == {b"new", b"empty"}
    assert lookup(ours, "etc/big.txt") is lookup(ours, "etc/big.hard")
    assert lookup(ours, "etc/null").rdev == os.makedev(1, 3)
    assert lookup(ours, "usr/share/doc") is None and lookup(ours, "usr/share/doc2/readme") is not None
    assert _new_mounts(before, tmp_path, s.base) == []
    assert pulled < 15


# --- 2. top layer only in the c/storage AIS: podman cannot mount it, we can --------------------------

def test_ais_only_image_mount_equals_kernel_overlay_of_diff_dirs(podman_stores, tmp_path, mount_guard):
    s = podman_stores
    info = s.images[AIS2]
    ais_overlay = f"{s.ais}/overlay/"
    assert len(info.diff_dirs) == 2 and all(d.startswith(ais_overlay) and d.endswith("/diff")
                                            for d in info.diff_dirs)
    top_id = info.diff_dirs[-1][len(ais_overlay):].split("/")[0]
    assert not (s.main / "overlay" / top_id).exists()
    before = mount_guard

    # podman 4.3.1 cannot mount an image whose top layer is in an additional store (it would need a
    # writable layer there): `Error: layer not known`.
    p = subprocess.run(["podman", "image", "mount", AIS2], env=s.env(), capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=120)
    podman_view = None
    if p.returncode != 0:
        assert "layer not known" in p.stderr, p.stderr
    else:  # a podman that can: then its view is one more reference, and must agree
        try:
            podman_view = scan_directory(p.stdout.strip())
        finally:
            _podman_umount(s, AIS2)

    store = _new_store(tmp_path, "store")
    rec = pull_cstorage(store, f"containers-storage:{AIS2}", storage_conf=s.main_conf)
    assert rec.id == info.id
    with store.mount(AIS2) as merged:
        ours = scan_directory(merged)
    store.close()

    hand = tmp_path / "hand"
    hand.mkdir()
    lower = ":".join(reversed(info.diff_dirs))            # top first
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lower}", str(hand)],
                   check=True, capture_output=True)
    try:
        kernel = scan_directory(hand)
    finally:
        subprocess.run(["umount", str(hand)], check=True)

    _assert_same_view(ours, kernel)
    _assert_cstorage_root(ours, info.diff_dirs[-1])
    assert lookup(ours, "etc/two").content == b"two\n" and lookup(ours, "etc/small") is None
    assert lookup(ours, "bin/busybox").digest is not None
    if podman_view is not None:
        _assert_same_view(podman_view, kernel)
    assert _new_mounts(before, tmp_path, s.base) == []


# --- 3. flatmount-level additional store (read-only bind mount) -------------------------------------

def _object_of(tree: Inode, path: str) -> str:
    """`XX/<62 hex>` of the object holding the content of `path`."""
    node = lookup(tree, path)
    assert node is not None and node.digest is not None
    return node.object_path


def test_additional_flatmount_store(podman_stores, tmp_path, mount_guard):
    require_tool("mount")
    s = podman_stores
    info = s.images[APP]
    before = mount_guard

    # A: the base image, pulled and flattened (so B can also start from A's cached flat image)
    a_dir = tmp_path / "A"
    a = open_store(a_dir, runroot=tmp_path / "run-A")
    base = pull_cstorage(a, f"containers-storage:{BASE}", storage_conf=s.main_conf)
    a.flatten(BASE)
    busybox = _object_of(a.layer_tree(base.top_layer), "bin/busybox")
    a.close()
    a_before = fingerprint(a_dir)
    assert (a_dir / "objects" / busybox).is_file()

    a_ro = tmp_path / "A_ro"
    a_ro.mkdir()
    subprocess.run(["mount", "--bind", str(a_dir), str(a_ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(a_ro)], check=True)
        with pytest.raises(OSError):
            (a_ro / "probe").touch()

        b = _new_store(tmp_path, "B", additional=[a_ro])
        rec = pull_cstorage(b, f"containers-storage:{APP}", storage_conf=s.main_conf)
        chain = b.layer_chain(rec.top_layer)
        assert [lay.diff_id for lay in chain] == info.diff_ids
        assert chain[0].id == base.top_layer and chain[0].store_root == str(a_ro)
        assert all(lay.store_root == str(b.root) for lay in chain[1:])
        # only the three new layers were imported into B: its own rows and layer images, no base object
        own = {row[0] for row in b.connect().execute("SELECT id FROM layers")}
        assert own == {lay.id for lay in chain[1:]}
        assert sorted(os.listdir(b.root / "layers")) == sorted(f"{lay.id}{ext}" for lay in chain[1:]
                                                               for ext in (".erofs", ".tree"))
        assert not (b.root / "objects" / busybox).exists()

        with b.mount(APP) as merged:
            fstype, options = _mount_entry(merged)
            assert fstype == "overlay"
            # B's objects first, then A's (through the read-only bind): the overlay's data-only lowers
            dirs = [str(b.root / "objects"), str(a_ro / "objects")]
            assert all(d in options for d in dirs), options
            assert options.index(dirs[0]) < options.index(dirs[1])
            leases = b.mounts()
            assert [x.merged for x in leases] == [merged]
            flat = os.path.join(b.root, "images", leases[0].image_digest + ".erofs")
            assert os.path.isfile(flat)                  # the flat image is B's own, A's stays as it was
            ours = scan_directory(merged)                # reads bin/busybox: served from A's objects
        b.close()
    finally:
        subprocess.run(["umount", str(a_ro)], check=False)
    assert fingerprint(a_dir) == a_before

    pm = _podman_mount(s, APP)
    try:
        theirs = scan_directory(pm)
    finally:
        _podman_umount(s, APP)
    _assert_same_view(ours, theirs)
    _assert_cstorage_root(ours, info.diff_dirs[-1])
    assert _object_of(ours, "bin/busybox") == busybox
    assert _new_mounts(before, tmp_path, s.base) == []
