"""Issue 13 items 7, 9, 11: paths a hostile user controls.

7: a store root or runroot (and their internal entries) another user could redirect is refused;
   deletions in tmp/ go through directory fds; a 0755 primary root becomes 0700 with a warning.
9: CLI outputs are written only to new or regular files (never through a symlink, never a device).
11: OCI blobs and `tar:` sources that are FIFOs, devices or symlinks are refused without hanging,
   and a blob is read at most to its declared size plus one byte.
Real files, real stores, real mounts; the hostile user is uid 65534 via setpriv.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from flatmount.api import open_store
from flatmount.errors import StoreError
from flatmount.pull import pull
from tests.conftest import require_root, require_tool

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "flatmount" / "examples" / "demo-oci"
NOBODY = 65534


def mkstore(root: Path, runroot: Path | None = None, **kw):
    kw.setdefault("additional", [])
    return open_store(root, runroot=runroot or root.parent / "run", config=os.devnull, **kw)


def cli(*args: str, uid: int | None = None, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`flatmount ARGS` in a subprocess (as `uid` via setpriv if given)."""
    cmd = [sys.executable, "-m", "flatmount", *args]
    if uid is not None:
        cmd = [require_tool("setpriv"), f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "FLATMOUNT_CONFIG": os.devnull, **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=full_env, timeout=timeout)


def as_nobody(*cmd: str) -> None:
    """Run a shell command as the hostile user (uid/gid 65534, no groups)."""
    subprocess.run([require_tool("setpriv"), f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                    *cmd], check=True, timeout=60)


@pytest.fixture
def shared_tmp():
    """A /tmp-like directory (root's, 1777) other users can reach: tmp_path's parents are 0700."""
    require_root()
    d = tempfile.mkdtemp(prefix="flatmount-hostile-", dir="/tmp")
    os.chmod(d, 0o1777)
    try:
        yield Path(d)
    finally:
        _unmount_below(d)
        shutil.rmtree(d, ignore_errors=True)


def _unmount_below(path: str) -> None:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for p in reversed(points):
        if p == path or p.startswith(path.rstrip("/") + "/"):
            subprocess.run(["umount", "-l", p], check=False)


def populated(root: Path):
    s = mkstore(root)
    pull(s, f"oci:{DEMO}:demo")
    s.close()


def canary_dir(base: Path) -> tuple[Path, Path]:
    victim = base / "victim"
    victim.mkdir()
    canary = victim / "canary"
    canary.write_bytes(b"must survive")
    old = time.time() - 3 * 86400  # older than any stale cutoff
    os.utime(canary, (old, old))
    return victim, canary


# --- item 7: internal entries swapped for symlinks --------------------------------------------------

def test_symlinked_tmp_is_refused_and_its_target_survives(tmp_path):
    root = tmp_path / "store"
    populated(root)
    victim, canary = canary_dir(tmp_path)
    opened = mkstore(root)          # opened before the swap: its later clean must not follow it
    shutil.rmtree(root / "tmp")
    os.symlink(victim, root / "tmp")
    with pytest.raises(StoreError, match="tmp"):
        opened.clean_tmp()
    with pytest.raises(StoreError, match="symbolic link"):
        mkstore(root)
    with pytest.raises(StoreError, match="symbolic link"):
        opened.ensure_writable()
    assert canary.read_bytes() == b"must survive" and os.listdir(victim) == ["canary"]
    opened.close()


def test_object_store_temp_cleaning_never_follows_a_symlinked_tmp(tmp_path):
    from objects import ObjectStore
    from objects.errors import ObjectStoreError

    objs = ObjectStore(tmp_path / "objects")
    victim, canary = canary_dir(tmp_path)
    os.rmdir(tmp_path / "objects" / ".tmp")
    os.symlink(victim, tmp_path / "objects" / ".tmp")
    try:
        with pytest.raises(ObjectStoreError, match="cannot clean"):
            objs.clean_temp(0)
    finally:
        objs.close()
    assert canary.read_bytes() == b"must survive"


def test_symlinked_layers_is_refused_and_nothing_written_there(tmp_path):
    root = tmp_path / "store"
    s = mkstore(root)
    s.ensure_writable()
    s.close()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.rmdir(root / "layers")
    os.symlink(elsewhere, root / "layers")
    with pytest.raises(StoreError, match="layers is a symbolic link"):
        pull(mkstore(root), f"oci:{DEMO}:demo")
    r = cli("--root", str(root), "--runroot", str(tmp_path / "run"), "pull", f"oci:{DEMO}:demo")
    assert r.returncode == 3 and "symbolic link" in r.stderr and "Traceback" not in r.stderr
    assert os.listdir(elsewhere) == []


def test_symlinked_gc_lock_creates_nothing_at_its_target(tmp_path):
    root = tmp_path / "store"
    populated(root)
    target = tmp_path / "created-through-the-link"
    os.unlink(root / "gc.lock")
    os.symlink(target, root / "gc.lock")
    for args in (["gc"], ["pull", f"oci:{DEMO}:demo"], ["images"]):
        r = cli("--root", str(root), "--runroot", str(tmp_path / "run"), *args)
        assert r.returncode == 3 and "gc.lock" in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert not os.path.lexists(target)
    # a store opened before the swap still never creates through it
    s = mkstore(root.parent / "store2")
    s.ensure_writable()
    os.unlink(s.root / "gc.lock")
    os.symlink(target, s.root / "gc.lock")
    with pytest.raises(StoreError, match="symbolic link"), s.gc_lock(shared=True):
        pass
    assert not os.path.lexists(target)
    s.close()


def test_symlinked_runroot_mounts_dir_is_refused(tmp_path):
    require_root()
    root, run = tmp_path / "store", tmp_path / "run"
    populated(root)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "0123456789abcdef" / "merged").mkdir(parents=True)  # looks like a leftover to cleanup
    run.mkdir(mode=0o700)
    os.symlink(elsewhere, run / "mounts")
    s = mkstore(root, run)
    try:
        with pytest.raises(StoreError, match="mounts is a symbolic link"), s.mount("demo"):
            pass
        with pytest.raises(StoreError, match="mounts is a symbolic link"):
            from flatmount.mount import cleanup

            cleanup(s)
    finally:
        _unmount_below(str(elsewhere))
        s.close()
    assert os.listdir(elsewhere) == ["0123456789abcdef"] and os.listdir(elsewhere / "0123456789abcdef") == ["merged"]
    assert s.mounts() == []


def test_runroot_and_mounts_dir_are_created_0700(tmp_path):
    require_root()
    root, run = tmp_path / "store", tmp_path / "a" / "b" / "run"
    populated(root)
    s = mkstore(root, run)
    old = os.umask(0)
    try:
        with s.mount("demo") as merged:
            assert os.path.isfile(os.path.join(merged, "etc", "demo-release"))
            for p in (run / "mounts", run, run.parent, run.parent.parent):
                assert stat.S_IMODE(os.stat(p).st_mode) == 0o700, p
    finally:
        os.umask(old)
        _unmount_below(str(run))
        s.close()
    os.chmod(run / "mounts", 0o755)         # an existing mounts dir others can read is made private
    s = mkstore(root, run)
    try:
        with s.mount("demo"):
            assert stat.S_IMODE(os.stat(run / "mounts").st_mode) == 0o700
    finally:
        _unmount_below(str(run))
        s.close()


def test_store_root_0755_is_made_0700_with_a_warning(tmp_path):
    root = tmp_path / "store"
    populated(root)
    os.chmod(root, 0o755)
    r = cli("--root", str(root), "--runroot", str(tmp_path / "run"), "images")
    assert r.returncode == 0, r.stderr
    assert "warning" in r.stderr and "0755" in r.stderr and "0700" in r.stderr
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    r = cli("--root", str(root), "--runroot", str(tmp_path / "run"), "images")
    assert r.returncode == 0 and r.stderr == ""
    # a new store is created 0700 whatever the umask, parents included
    new = tmp_path / "a" / "b" / "store"
    old = os.umask(0)
    try:
        s = mkstore(new)
        s.ensure_writable()
        s.close()
    finally:
        os.umask(old)
    for p in (new, new.parent, new.parent.parent):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o700, p


def test_group_writable_store_root_or_component_is_refused(tmp_path):
    root = tmp_path / "shared" / "store"
    root.parent.mkdir()
    os.chmod(root.parent, 0o775)
    with pytest.raises(StoreError, match="writable by group or others"):
        mkstore(root)
    os.chmod(root.parent, 0o1777)           # sticky: like /tmp, fine on the way
    s = mkstore(root)
    s.ensure_writable()
    s.close()
    os.chmod(root, 0o770)
    with pytest.raises(StoreError, match="writable by group or others"):
        mkstore(root)


def test_additional_store_rules(tmp_path):
    ais = tmp_path / "ais"
    populated(ais)
    os.chmod(ais, 0o755)                    # read-only stores may be world-readable
    s = mkstore(tmp_path / "primary", additional=[ais])
    assert [i.names for i in s.images()] == [("demo:latest",)]
    s.close()
    assert stat.S_IMODE(os.stat(ais).st_mode) == 0o755    # never changed
    os.chmod(ais, 0o757)
    with pytest.raises(StoreError, match="writable by group or others"):
        mkstore(tmp_path / "primary", additional=[ais])
    os.chmod(ais, 0o755)
    os.rename(ais / "objects", tmp_path / "objs")
    os.symlink(tmp_path / "objs", ais / "objects")
    with pytest.raises(StoreError, match="objects is a symbolic link"):
        mkstore(tmp_path / "primary", additional=[ais])


# --- item 7: another user (uid 65534) owns or can write a component ---------------------------------

def test_store_dir_made_by_another_user_is_refused(shared_tmp):
    victim, canary = canary_dir(shared_tmp)
    os.chmod(victim, 0o755)
    bad = shared_tmp / "evil"
    as_nobody("mkdir", "-m", "0700", str(bad))
    as_nobody("mkdir", "-m", "0700", str(bad / "store"))
    as_nobody("ln", "-s", str(victim), str(bad / "store" / "tmp"))
    r = cli("--root", str(bad / "store"), "--runroot", str(shared_tmp / "run"), "pull", f"oci:{DEMO}:demo")
    assert r.returncode == 3 and "owned by uid 65534" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert canary.read_bytes() == b"must survive"
    # a store below a directory of another user is refused too (they could swap it)
    r = cli("--root", str(bad / "store" / "sub"), "--runroot", str(shared_tmp / "run"), "images")
    assert r.returncode == 3 and "owned by uid 65534" in r.stderr
    # so is a path through a symlink another user planted in a sticky directory
    os.mkdir(shared_tmp / "mine", 0o700)
    as_nobody("ln", "-s", str(shared_tmp / "mine"), str(shared_tmp / "link"))
    r = cli("--root", str(shared_tmp / "link" / "store"), "--runroot", str(shared_tmp / "run"), "images")
    assert r.returncode == 3 and "symbolic link owned by uid 65534" in r.stderr, r.stderr
    assert os.listdir(shared_tmp / "mine") == []


def test_runroot_of_another_user_is_refused(shared_tmp):
    root = shared_tmp / "store"
    populated(root)
    as_nobody("mkdir", "-m", "0700", str(shared_tmp / "evilrun"))
    s = mkstore(root, shared_tmp / "evilrun")
    try:
        with pytest.raises(StoreError, match="owned by uid 65534"), s.mount("demo"):
            pass
        from flatmount.mount import cleanup

        with pytest.raises(StoreError, match="owned by uid 65534"):
            cleanup(s)
    finally:
        s.close()
    assert os.listdir(shared_tmp / "evilrun") == []


def test_unprivileged_caller_refuses_writable_or_foreign_components(shared_tmp):
    tar = shared_tmp / "layer.tar"
    subprocess.run(["tar", "-C", str(ROOT / "flatmount" / "examples"), "-cf", str(tar), "demo-oci/oci-layout"], check=True)
    os.chmod(tar, 0o644)
    open_dir = shared_tmp / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)               # not sticky: anyone may rename what is inside
    r = cli("--root", str(open_dir / "store"), "--runroot", str(shared_tmp / "nrun"), "pull", f"tar:{tar}",
            uid=NOBODY, env={"HOME": str(shared_tmp)})
    assert r.returncode == 3 and "writable by group or others" in r.stderr, r.stderr
    assert not (open_dir / "store").exists()
    rootdir = shared_tmp / "roots"          # root's own directory: fine on the way, not as the store
    rootdir.mkdir(mode=0o755)
    r = cli("--root", str(rootdir), "--runroot", str(shared_tmp / "nrun"), "pull", f"tar:{tar}", uid=NOBODY)
    assert r.returncode == 3 and "not by you" in r.stderr, r.stderr
    r = cli("--root", str(rootdir), "--runroot", str(shared_tmp / "nrun"), "images", uid=NOBODY)
    assert r.returncode == 0, r.stderr      # reading root's store read-only is fine
    # a store of its own below root's sticky directory works (the library: this python's site-packages
    # under /root are out of this user's reach, and the CLI's import needs them)
    code = ("import os, sys; from flatmount.api import open_store; "
            "s = open_store(sys.argv[1], runroot=sys.argv[2], config=os.devnull, additional=[]); "
            "s.ensure_writable(); s.connect(); s.close()")
    r = subprocess.run([require_tool("setpriv"), f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        sys.executable, "-c", code, str(shared_tmp / "own" / "store"), str(shared_tmp / "nrun")],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       timeout=60)
    assert r.returncode == 0, r.stderr
    st = os.stat(shared_tmp / "own" / "store")
    assert st.st_uid == NOBODY and stat.S_IMODE(st.st_mode) == 0o700


# --- item 9: CLI outputs only to new or regular files -----------------------------------------------

WORDS = {"device": "device", "symlink": "symbolic link", "fifo": "FIFO", "directory": "directory"}


def _outputs(tmp_path: Path, suffix: str) -> dict[str, Path]:
    """OUT candidates that must be refused: a device like /dev/full, a symlink, a FIFO, a directory."""
    require_root()  # mknod
    d = tmp_path / "outs"
    d.mkdir()
    outs = {"device": d / f"full{suffix}", "symlink": d / f"link{suffix}", "fifo": d / f"fifo{suffix}",
            "directory": d / f"dir{suffix}"}
    os.mknod(outs["device"], stat.S_IFCHR | 0o666, os.makedev(1, 7))
    (d / "target").write_bytes(b"the link's target")
    os.symlink(d / "target", outs["symlink"])
    os.mkfifo(outs["fifo"])
    outs["directory"].mkdir()
    return outs


def _unchanged(outs: dict[str, Path]) -> None:
    assert stat.S_ISCHR(os.lstat(outs["device"]).st_mode) and os.lstat(outs["device"]).st_rdev == os.makedev(1, 7)
    assert os.path.islink(outs["symlink"]) and (outs["symlink"].parent / "target").read_bytes() == b"the link's target"
    assert stat.S_ISFIFO(os.lstat(outs["fifo"]).st_mode) and os.listdir(outs["directory"]) == []
    assert sorted(os.listdir(outs["device"].parent)) == sorted([*(p.name for p in outs.values()), "target"])


def _src_dir(tmp_path: Path, name: str, content: bytes) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "f").write_bytes(content)
    os.utime(d / "f", (1, 1))
    return d


def test_mkimage_writes_only_new_or_regular_files(tmp_path, capsysbinary):
    from flatmount.cli import main

    src = _src_dir(tmp_path, "src", b"hello")
    outs = _outputs(tmp_path, ".img")
    for kind, out in outs.items():
        assert main(["mkimage", str(src), str(out)]) == 3, kind
        err = capsysbinary.readouterr().err.decode()
        assert f"is a {WORDS[kind]}" in err and "Traceback" not in err, (kind, err)
    _unchanged(outs)
    new, regular = tmp_path / "new.img", tmp_path / "old.img"
    regular.write_bytes(b"old")
    for out in (new, regular):
        assert main(["mkimage", str(src), str(out)]) == 0
        assert out.read_bytes()[1024:1028] == b"\xe2\xe1\xf5\xe0"  # EROFS superblock magic
    from flatmount.errors import OutputError
    from flatmount.image.writer import write_image
    from flatmount.sources.directory import scan_directory

    with pytest.raises(OutputError, match="symbolic link"):
        write_image(scan_directory(str(src)), outs["symlink"])
    _unchanged(outs)


def test_diff_output_writes_only_new_or_regular_files(tmp_path, capsysbinary):
    from flatmount.cli import main

    imgs = []
    for name, content in (("a", b"one"), ("b", b"two")):
        img = tmp_path / f"{name}.img"
        assert main(["mkimage", str(_src_dir(tmp_path, name, content)), str(img)]) == 0
        imgs.append(str(img))
    objs = tmp_path / "objs"
    objs.mkdir()
    outs = _outputs(tmp_path, ".tar")
    capsysbinary.readouterr()
    for kind, out in outs.items():
        assert main(["diff", *imgs, "-o", str(out), "--objects", str(objs)]) == 3, kind
        err = capsysbinary.readouterr().err.decode()
        assert f"is a {WORDS[kind]}" in err and "Traceback" not in err, (kind, err)
    _unchanged(outs)
    out = tmp_path / "layer.tar"
    out.write_bytes(b"old")
    assert main(["diff", *imgs, "-o", str(out), "--objects", str(objs)]) == 0
    import tarfile

    with tarfile.open(out) as tf:
        assert "f" in [m.name.removeprefix("./") for m in tf.getmembers()]


# --- item 11: sources that are FIFOs, devices or symlinks -------------------------------------------

def _layout(tmp_path: Path) -> tuple[Path, Path]:
    """An OCI layout of one small plain-tar layer; returns (layout dir, that layer's blob path)."""
    from tests.tarbuild import Tar, make_oci

    t = Tar()
    t.file("etc/a", b"a" * 500)
    d = tmp_path / "layout"
    info = make_oci(d, [(t.bytes(), "none")])
    return d, d / "blobs" / "sha256" / info["layers"][0]["digest"].split(":")[1]


def _pull(tmp_path: Path, source: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """`flatmount pull SOURCE` in a subprocess: a hang is a failure (killed at `timeout`), not a stuck suite."""
    try:
        return cli("--root", str(tmp_path / "store"), "--runroot", str(tmp_path / "run"), "pull", source,
                   timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pull {source} hung")


def _refused(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def _no_images(tmp_path: Path) -> None:
    r = cli("--root", str(tmp_path / "store"), "--runroot", str(tmp_path / "run"), "images", "--json")
    assert r.returncode == 0 and '"id"' not in r.stdout, r.stdout


@pytest.mark.parametrize("kind", ["fifo", "dev-zero-node", "symlink-to-dev-zero"])
def test_oci_blob_that_never_ends_is_refused_without_hanging(tmp_path, kind):
    layout, blob = _layout(tmp_path)
    os.unlink(blob)
    if kind == "fifo":
        os.mkfifo(blob)
    elif kind == "dev-zero-node":
        require_root()
        os.mknod(blob, stat.S_IFCHR | 0o666, os.makedev(1, 5))
    else:
        os.symlink("/dev/zero", blob)
    words = {"fifo": "is a FIFO", "dev-zero-node": "is a device", "symlink-to-dev-zero": "is a symbolic link"}
    _refused(_pull(tmp_path, f"oci:{layout}:t"), blob.name[:12], words[kind])
    _no_images(tmp_path)


def test_oci_blob_symlink_error_reveals_nothing_about_its_target(tmp_path):
    layout, blob = _layout(tmp_path)
    secret = tmp_path / "secret"
    secret.write_bytes(b"s3cret contents of a file the layout's author cannot read" * 7)
    os.chmod(secret, 0o600)
    os.unlink(blob)
    os.symlink(secret, blob)
    r = _pull(tmp_path, f"oci:{layout}:t")
    _refused(r, "is a symbolic link")
    import hashlib

    size, digest = str(secret.stat().st_size), hashlib.sha256(secret.read_bytes()).hexdigest()
    assert size not in r.stderr and digest[:12] not in r.stderr and "secret" not in r.stderr, r.stderr
    # the same for the layout's own JSON documents and directories
    for rel in ("index.json", "oci-layout"):
        layout2, _ = _layout(tmp_path / rel)
        os.unlink(layout2 / rel)
        os.symlink(secret, layout2 / rel)
        r = _pull(tmp_path, f"oci:{layout2}:t")
        _refused(r, "symbolic link")
        assert size not in r.stderr and "secret" not in r.stderr, r.stderr
    layout3, _ = _layout(tmp_path / "linked-blobs")
    os.rename(layout3 / "blobs", tmp_path / "real-blobs")
    os.symlink(tmp_path / "real-blobs", layout3 / "blobs")
    _refused(_pull(tmp_path, f"oci:{layout3}:t"), "blobs is not a directory")


def test_oci_index_fifo_is_refused_without_hanging(tmp_path):
    layout, _ = _layout(tmp_path)
    os.unlink(layout / "index.json")
    os.mkfifo(layout / "index.json")
    _refused(_pull(tmp_path, f"oci:{layout}:t"), "index.json is a FIFO")


def test_oci_blob_longer_than_declared_is_read_no_further(tmp_path):
    layout, blob = _layout(tmp_path)
    declared = blob.stat().st_size
    with open(blob, "r+b") as f:        # a sparse 64 GiB tail: reading it all would take minutes
        f.truncate(64 << 30)
    t0 = time.monotonic()
    r = _pull(tmp_path, f"oci:{layout}:t", timeout=60)
    _refused(r, "longer than declared", f"says {declared} bytes")
    assert time.monotonic() - t0 < 20
    _no_images(tmp_path)


def test_tar_source_must_be_a_regular_file(tmp_path):
    from tests.tarbuild import Tar

    fifo = tmp_path / "layer.fifo"
    os.mkfifo(fifo)
    _refused(_pull(tmp_path, f"tar:{fifo}"), "is a FIFO")
    _refused(_pull(tmp_path, "tar:/dev/zero"), "/dev/zero is a device")
    _refused(_pull(tmp_path, "/dev/zero"), "/dev/zero is a device")
    _refused(_pull(tmp_path, f"tar:{tmp_path}"), "is a directory")
    _no_images(tmp_path)
    # the user's own symlink to a regular tar, given on the command line, is followed
    t = Tar()
    t.file("etc/a", b"a" * 500)
    (tmp_path / "real.tar").write_bytes(t.bytes())
    os.symlink(tmp_path / "real.tar", tmp_path / "link.tar")
    r = _pull(tmp_path, f"tar:{tmp_path / 'link.tar'}")
    assert r.returncode == 0, r.stderr
    # and stdin stays allowed
    r = subprocess.run([sys.executable, "-m", "flatmount", "--root", str(tmp_path / "store"), "--runroot",
                        str(tmp_path / "run"), "pull", "-"], input=t.bytes(), capture_output=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "FLATMOUNT_CONFIG": os.devnull}, timeout=60)
    assert r.returncode == 0, r.stderr
