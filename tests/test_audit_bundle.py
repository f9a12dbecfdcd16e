"""Audit of issue 13 item 7 against `flatmount bundle --remove DIR`: DIR is the user's, not ours.

A directory with a record that flatmount did not write (copied from a real bundle, or forged by
someone who can write the directory) must not make root delete files outside it (a `stubs` that is
a symlink) nor unmount and release another mount's lease.  Real store, real mounts, the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT, require_root, require_tool

RECORD = "flatmount-bundle.json"


def _cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flatmount", "--root", str(tmp_path / "store"),
                           "--runroot", str(tmp_path / "run"), *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT))


def _forge(d, **fields) -> None:
    d.mkdir()
    rec = {"version": 1, "image": "demo", "lease": None, "stubs": [], "rootfs": None, "owner_pid": 1,
           "owner_start": 1, "boot_id": "x", "created": 0, **fields}
    (d / RECORD).write_text(json.dumps(rec))


def test_remove_does_not_delete_through_a_symlinked_stubs_dir(tmp_path):
    require_root()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me\n")
    d = tmp_path / "forged"
    _forge(d, released=True, stubs=[str(d / "stubs"), str(d / "stubs" / "precious")])
    os.symlink(victim, d / "stubs")
    r = _cli(tmp_path, "bundle", "--remove", str(d))
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "symlink" in r.stderr, r.stderr
    assert (victim / "precious").read_text() == "keep me\n"


def test_remove_does_not_release_another_mounts_lease(tmp_path):
    require_root()
    r = _cli(tmp_path, "pull", f"oci:{ROOT}/flatmount/examples/demo-oci:demo", "--name", "demo")
    assert r.returncode == 0, r.stderr
    merged = _cli(tmp_path, "mount", "demo").stdout.strip()
    try:
        lease = os.path.basename(os.path.dirname(merged))
        d = tmp_path / "forged"
        _forge(d, lease=lease)
        r = _cli(tmp_path, "bundle", "--remove", str(d))
        assert r.returncode == 3 and "not its mount" in r.stderr, r.stderr
        assert os.path.ismount(merged)
        (d / RECORD).unlink()
        _forge(tmp_path / "forged2", lease=lease, merged=merged)   # the merged path is public
        r = _cli(tmp_path, "bundle", "--remove", str(tmp_path / "forged2"))
        assert r.returncode == 3 and "not its mount" in r.stderr, r.stderr
        assert os.path.ismount(merged)
        assert json.loads(_cli(tmp_path, "mounts", "--json").stdout)[0]["merged"] == merged
        assert os.listdir(os.path.join(merged, "etc"))
    finally:
        r = _cli(tmp_path, "umount", merged)
        if os.path.ismount(merged):
            subprocess.run(["umount", "-l", merged], check=False)
    assert r.returncode == 0, r.stderr


DAMAGED = ['{"kind": "container", "created": "x", "image": 5, "detached": true}',
           '{"kind": "container", "runtime": "runc", "lease": [1], "detached": true}',
           '{"kind": "container", "stubs": [1], "detached": true}',
           "[" * 100_000, "garbage{", ""]


def test_damaged_container_record_is_refused_and_kills_nothing(tmp_path):
    """Item 4 for the records of `run`: a record with wrong types made ps/cleanup/stop/rm fail with
    internal errors (TypeError); every damaged record is now unreadable: ps skips it, cleanup leaves
    it (and its running container) alone, stop/rm say it is damaged."""
    require_root()
    busybox = "/bin/busybox" if os.path.isfile("/bin/busybox") else "/usr/bin/busybox"
    r = _cli(tmp_path, "pull", f"oci:{ROOT}/flatmount/examples/demo-oci:demo", "--name", "demo")
    assert r.returncode == 0, r.stderr
    r = _cli(tmp_path, "run", "-d", "-v", f"{busybox}:/bin/busybox:ro", "demo", "--", "/bin/busybox",
             "sleep", "300")
    assert r.returncode == 0, r.stderr
    cid = r.stdout.strip()
    rec = tmp_path / "run" / "containers" / cid / RECORD
    good = rec.read_bytes()
    try:
        for text in DAMAGED:
            rec.write_text(text)
            for cmd in (["ps", "-a"], ["cleanup"]):
                r = _cli(tmp_path, *cmd)
                assert r.returncode == 0 and "internal error" not in r.stderr, (text[:40], cmd, r.stderr)
            for cmd in (["stop", "-t", "1", cid], ["rm", "-f", cid]):
                r = _cli(tmp_path, *cmd)
                assert r.returncode == 3 and "is damaged" in r.stderr, (text[:40], cmd, r.stderr)
            rec.write_bytes(good)
            assert json.loads(_cli(tmp_path, "ps", "--json").stdout)[0]["status"] == "running", text[:40]
    finally:
        rec.write_bytes(good)
        r = _cli(tmp_path, "rm", "-f", cid)
        if r.returncode != 0:
            subprocess.run(["runc", "--root", str(tmp_path / "run" / "runc"), "delete", "--force", cid],
                           check=False)
            with open("/proc/self/mountinfo") as f:
                for m in reversed([ln.split(" ")[4] for ln in f if str(tmp_path) in ln]):
                    subprocess.run(["umount", "-l", m], check=False)
    assert r.returncode == 0, r.stderr
    assert json.loads(_cli(tmp_path, "mounts", "--json").stdout) == []


def test_bundle_refuses_a_directory_another_user_can_change(tmp_path):
    """root writes config.json and mounts the rootfs in the bundle dir: an empty dir owned by another
    user, or world-writable, or under such a dir, was accepted (its owner could then swap entries
    for symlinks: config.json -> /etc/shadow, rootfs -> /etc)."""
    require_root()
    r = _cli(tmp_path, "pull", f"oci:{ROOT}/flatmount/examples/demo-oci:demo", "--name", "demo")
    assert r.returncode == 0, r.stderr
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    try:
        for d in (theirs, shared, shared / "sub"):
            r = _cli(tmp_path, "bundle", "demo", str(d))
            assert r.returncode == 3 and r.stderr.count("\n") == 1 and "StoreError" in r.stderr, r.stderr
            assert not (shared / "sub").exists() and os.listdir(theirs) == [] and os.listdir(shared) == []
    finally:
        for d in (theirs, shared, shared / "sub"):
            if (d / RECORD).exists():
                _cli(tmp_path, "bundle", "--remove", str(d))
    mine = tmp_path / "mine"
    r = _cli(tmp_path, "bundle", "demo", str(mine))
    assert r.returncode == 0, r.stderr
    r = _cli(tmp_path, "bundle", "--remove", str(mine))
    assert r.returncode == 0, r.stderr
    assert json.loads(_cli(tmp_path, "mounts", "--json").stdout) == []


def test_failed_mount_point_leaves_no_container_behind(tmp_path):
    """A -v target under a file of the image, or too long for PATH_MAX: `run` failed half-way
    through making the stub mount points and left its container dir (stubs not in its record), on
    which every later `cleanup` failed with "Directory not empty"."""
    require_root()
    require_tool("runc")
    busybox = "/bin/busybox" if os.path.isfile("/bin/busybox") else "/usr/bin/busybox"
    r = _cli(tmp_path, "pull", f"oci:{ROOT}/flatmount/examples/demo-oci:demo", "--name", "demo")
    assert r.returncode == 0, r.stderr
    deep = "/" + "/".join(["a"] * 2100)
    for target in ("/etc/os-release/x", deep):
        r = _cli(tmp_path, "run", "--rm", "-v", f"/etc:{target}", "-v", f"{busybox}:/bin/busybox:ro",
                 "demo", "--", "/bin/busybox", "true")
        assert r.returncode == 3 and r.stderr.count("\n") == 1 and "BundleError" in r.stderr, r.stderr
        assert len(r.stderr) < 400
        assert os.listdir(tmp_path / "run" / "containers") == []
    r = _cli(tmp_path, "cleanup")
    assert r.returncode == 0, r.stderr


def test_cleanup_removes_a_container_dir_with_unrecorded_stubs(tmp_path):
    """What older versions left (above): cleanup removes it, through dir fds, instead of failing."""
    require_root()
    assert _cli(tmp_path, "cleanup").returncode == 0
    cdir = tmp_path / "run" / "containers" / "0123456789ab"
    (cdir / "stubs" / "etc" / "deep").mkdir(parents=True)
    (cdir / "stubs" / "etc" / "hosts").write_bytes(b"")
    os.chmod(tmp_path / "run" / "containers", 0o700)
    rec = {"version": 1, "kind": "container", "id": cdir.name, "image": "demo", "runtime": "runc",
           "owner_pid": 999_999_999, "owner_start": 1, "boot_id": "x", "created": 0, "lease": None,
           "stubs": [str(cdir / "stubs")], "rootfs": None, "detached": False, "released": False}
    (cdir / RECORD).write_text(json.dumps(rec))
    r = _cli(tmp_path, "cleanup")
    assert r.returncode == 0 and cdir.name in r.stdout, r.stdout + r.stderr
    assert not cdir.exists()


def test_cleanup_removes_a_record_write_cut_short(tmp_path):
    """A kill during a record's atomic write leaves a `.tmp-*` file beside the record: cleanup (and
    remove) then failed with "Directory not empty" on the container dir (test_kill9_trials_... flaked)."""
    require_root()
    assert _cli(tmp_path, "cleanup").returncode == 0
    cdir = tmp_path / "run" / "containers" / "k9"
    cdir.mkdir(parents=True)
    os.chmod(tmp_path / "run" / "containers", 0o700)
    (cdir / ".tmp-abcdefgh").write_bytes(b"")
    rec = {"version": 1, "kind": "container", "id": "k9", "image": "demo", "runtime": "runc",
           "owner_pid": 999_999_999, "owner_start": 1, "boot_id": "x", "created": 0, "lease": None,
           "stubs": [], "rootfs": None, "detached": False, "released": False}
    (cdir / RECORD).write_text(json.dumps(rec))
    r = _cli(tmp_path, "cleanup")
    assert r.returncode == 0 and "k9" in r.stdout, r.stdout + r.stderr
    assert not cdir.exists()
