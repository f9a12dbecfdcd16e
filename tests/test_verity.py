"""fs-verity: the probe, enabling/measuring and their error paths, the store's record, and when a mount
asks overlayfs for `verity=require` (real files, tmpfs and mounts; the test kernel may lack fs-verity:
then the fallback path is what is checked, against the `fsverity` tool's own answer)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from conftest import require_root, require_tool
from test_mount import BIG, EXPECT, make_stores, open_primary, read_all, unmount_everything_below

from flatmount.flatten import flatten_image
from flatmount.kernel import kmount
from flatmount.mount import _verity_ready, involved_object_dirs, mount, verity_required
from objects import ObjectStore, verity
from objects.digest import fsverity_digest
from objects.errors import ObjectStoreError


def tool_says_supported(directory: Path) -> tuple[bool, str]:
    """`fsverity enable` on a one-block file in `directory`: (worked, its error output)."""
    f = directory / "tool-probe"
    f.write_bytes(bytes(4096))
    r = subprocess.run([require_tool("fsverity"), "enable", str(f)], capture_output=True, text=True)
    f.unlink()
    return r.returncode == 0, r.stderr


@pytest.fixture
def tmpfs(tmp_path: Path):
    require_root()
    d = tmp_path / "tmpfs"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "verity-test", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_probe_agrees_with_the_fsverity_tool(tmp_path: Path):
    ok, why = verity.probe(str(tmp_path))
    tool_ok, tool_err = tool_says_supported(tmp_path)
    assert ok == tool_ok, (why, tool_err)
    if not ok:   # this kernel/file system: EOPNOTSUPP, the same refusal the tool reports
        assert "ENOTSUP" in why or "EOPNOTSUPP" in why
        assert "Operation not supported" in tool_err
    assert [p for p in os.listdir(tmp_path) if p.startswith(".verity-probe")] == []   # probe file removed


def test_tmpfs_refuses_and_every_error_path_is_an_object_store_error(tmpfs: Path, tmp_path: Path):
    ok, why = verity.probe(str(tmpfs))
    assert not ok and "ENOTTY" in why                     # tmpfs has no fs-verity ioctls at all
    f = tmpfs / "file"
    f.write_bytes(b"x" * 5000)
    fd = os.open(f, os.O_RDONLY)
    try:
        with pytest.raises(verity.VerityUnsupportedError) as ei:
            verity.enable(fd)
        assert ei.value.errno == errno.ENOTTY and isinstance(ei.value, ObjectStoreError)
        assert verity.measure(fd) is None                 # no digest: "has no verity", not an error
    finally:
        os.close(fd)
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(ObjectStoreError, match="EBADF") as ei:   # a refusal that is not "unsupported"
        verity.enable(w)
    assert not isinstance(ei.value, verity.VerityUnsupportedError)
    with pytest.raises(ObjectStoreError, match="EBADF"):
        verity.measure(w)
    # a directory the probe cannot even write to
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "verity-ro", str(ro)], check=True)
    try:
        ok, why = verity.probe(str(ro))
        assert not ok and "cannot create a probe file" in why
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_puts_record_the_state_and_never_fail(where: str, tmp_path: Path, request):
    base = request.getfixturevalue("tmpfs") if where == "tmpfs" else tmp_path
    supported, _why = verity.probe(str(base))
    objdir = base / "objects"
    with ObjectStore(objdir) as store:
        digests = [store.put_bytes(b) for b in (b"small", *BIG)]
        store.sync()
        state = (objdir / verity.STATE_FILE).read_text()
        assert store.verity_state() == verity.read_state(str(objdir))
    if supported:
        assert state == "all\n"
        for d in digests:
            with open(objdir / d.hex()[:2] / d.hex()[2:], "rb") as f:
                assert verity.measure(f.fileno()) == d      # enabled, and the kernel agrees with the name
    else:
        assert state.startswith("off: ") and ("ENOTTY" if where == "tmpfs" else "ENOTSUP") in state
    for d, data in zip(digests, (b"small", *BIG), strict=True):
        assert fsverity_digest((objdir / d.hex()[:2] / d.hex()[2:]).read_bytes()) == d == fsverity_digest(data)
    # a store that already held objects before its first probe is "new", never "all"
    (objdir / verity.STATE_FILE).unlink()
    with ObjectStore(objdir) as store:
        store.put_bytes(b"another one")
        store.sync()
        assert verity.read_state(str(objdir)) == (verity.NEW if supported else verity.OFF)


def test_overlay_options_and_the_kernel_enforcing_require(tmp_path: Path):
    require_root()
    assert kmount.overlay_options() == [("metacopy", "on"), ("redirect_dir", "on")]
    assert kmount.overlay_options(True)[-1] == ("verity", "require")
    assert verity_required(["all", "all"], True)
    assert not verity_required(["all", "new"], True)
    assert not verity_required(["all", None], True)
    assert not verity_required(["all", "off"], True)
    assert not verity_required(["all"], False)
    assert not verity_required([], True)
    paths = make_stores(tmp_path)
    try:
        store = open_primary(paths)
        flat = flatten_image(store, "app")
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        for api in ("fd", "mount2", "legacy"):
            kmount.mount_image(flat.path, str(mnt), store.object_dirs(), api=api, verity=True)
            try:
                assert "verity=require" in kmount.find_mount(str(mnt)).super_options
                assert (mnt / "etc/os-release").read_bytes() == EXPECT["etc/os-release"]   # inline
                if not verity.probe(store.objects_dir)[0]:
                    # an object without fs-verity is unreadable under `require`: why a mount only
                    # asks for it when every object dir records "all"
                    with pytest.raises(OSError) as ei:
                        (mnt / "app/main").read_bytes()
                    assert ei.value.errno == errno.EIO
            finally:
                kmount.umount_image(str(mnt))
    finally:
        unmount_everything_below(str(tmp_path))


def test_mount_uses_require_only_when_everything_has_verity(tmp_path: Path):
    require_root()
    paths = make_stores(tmp_path)
    try:
        store = open_primary(paths)
        supported = verity.probe(store.objects_dir)[0]
        flat = flatten_image(store, "app")
        from flatmount.flatten import chain_of

        dirs = involved_object_dirs(store, chain_of(store, "app"), flat.path)
        assert len(dirs) == 2
        assert _verity_ready(store, flat, dirs) == supported
        with mount(store, "app") as merged:
            assert ("verity=require" in kmount.find_mount(merged).super_options) == supported
            assert read_all(merged) == EXPECT
        if not supported:
            # even with both object dirs recorded as "all", an image that cannot get fs-verity keeps
            # `require` off, quietly: the mount still works
            for d in dirs:
                Path(d, verity.STATE_FILE).write_text("all\n")
            assert _verity_ready(store, flat, dirs) is False
            with open(flat.path, "rb") as f:
                assert verity.measure(f.fileno()) is None
            with mount(store, "app") as merged:
                assert "verity=require" not in kmount.find_mount(merged).super_options
                assert read_all(merged) == EXPECT
    finally:
        unmount_everything_below(str(tmp_path))
