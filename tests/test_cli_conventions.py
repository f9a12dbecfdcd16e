"""The CLI behaves as its ecosystem (podman, skopeo, git) taught users to expect: --version, -q/-v,
described subcommands in data-flow order, options only where they apply, and the fixes for what a
new user met (umount --lazy, mount-image checks, stale marks, refs of removed images, tag grammar,
rmi --force, CREATED, additional-store checks).  Real stores, real mounts."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, require_root

from flatmount.cli import build_parser, main
from flatmount.kernel import kmount

EXAMPLE = ROOT / "flatmount" / "examples" / "demo-oci"


def _ours(mountpoint: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if f" {mountpoint} " in line]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """main(argv) -> (exit code, stdout, stderr); argparse's SystemExit becomes its code."""
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def store(tmp_path, capsys):
    """CLI store options of a store holding the demo images (demo-base, demo)."""
    opts = ["--root", str(tmp_path / "root"), "--runroot", str(tmp_path / "run")]
    for tag in ("demo-base", "demo"):
        assert run(capsys, *opts, "pull", f"oci:{EXAMPLE}:{tag}")[0] == 0
    yield opts
    for line in list(open("/proc/self/mountinfo")):   # whatever a failed test left mounted
        mp = line.split()[4]
        if mp.startswith(str(tmp_path)):
            kmount.umount_image(mp, lazy=True)


# --- global options -----------------------------------------------------------------------------

def test_version_says_which_hashing(capsys):
    from objects.digest import implementation

    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and out.startswith("flatmount ") and f"fs-verity hashing: {implementation()}" in out


def test_debug_logs_the_mount_path_and_flatten_choice(store, capsys):
    require_root()
    rc, out, err = run(capsys, "-v", *store, "mount", "demo")
    merged = out.strip()
    try:
        assert rc == 0, err
        assert "mount path" in err and merged in err          # kmount: which mount API path
        assert "flatten" in err and "writes" in err           # flatten: helper or not
    finally:
        assert run(capsys, *store, "umount", merged)[0] == 0
    import logging

    assert not logging.getLogger("flatmount").handlers      # -v held for that call only
    rc, out, err = run(capsys, "-q", *store, "pull", f"oci:{EXAMPLE}:demo")
    assert rc == 0 and err == "" and out.strip()


@pytest.mark.parametrize("argv", [
    ["--root", "/nonexistent", "dump", "x.img"],
    ["--additional-store", "/x", "mkimage", "--from-dump", "d", "o"],
    ["--json", "dump", "x.img"],
    ["--json", "demo"],
    ["dump", "--json", "x.img"],
    ["mount-image", "--root", "/r", "i", "m", "--objects", "o"],
])
def test_options_refused_where_they_do_not_apply(argv, capsys):
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and ("does not apply" in err or "unrecognized arguments" in err), err


def _subparsers(parser: argparse.ArgumentParser):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in a._choices_actions}
            for name, sp in a.choices.items():
                yield name, helps.get(name), sp
                yield from _subparsers(sp)


def test_every_subcommand_and_positional_is_described():
    names = []
    for name, help_text, sp in _subparsers(build_parser()):
        names.append(name)
        assert help_text and sp.description, f"subcommand {name} lacks a help line or description"
        for a in sp._actions:
            if not a.option_strings and not isinstance(a, argparse._SubParsersAction):
                assert a.help, f"{name}: positional {a.dest} has no help"
    # the data flow: import, records, flatten, mount, diff, maintenance
    order = [names.index(n) for n in ("pull", "images", "flatten", "mount", "umount", "diff", "gc", "fsck")]
    assert order == sorted(order)


def test_diff_help_says_gits_order(capsys):
    with pytest.raises(SystemExit):
        main(["diff", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "git's (OLD NEW)" in out and "podman image diff NEW OLD" in out


# --- fixes of what a new user met ----------------------------------------------------------------

def test_umount_of_a_busy_mount_suggests_lazy_and_lazy_works(store, capsys):
    require_root()
    rc, out, _ = run(capsys, *store, "mount", "demo")
    merged = out.strip()
    f = open(os.path.join(merged, "etc/os-release"), "rb")
    try:
        rc, _, err = run(capsys, *store, "umount", merged)
        assert rc == 3 and "--lazy" in err and _ours(merged)
        rc, _, err = run(capsys, *store, "umount", "--lazy", merged)
        assert rc == 0, err
        assert not _ours(merged) and not os.path.exists(merged)
        assert b"Demo Linux" in f.read()                     # the open file stays readable
        (lease,) = json.loads(run(capsys, *store, "mounts", "--json")[1])
        assert lease["detached_sb"] and lease["stale_reason"] is None    # still in use: live
        assert "live (detached, in use)" in run(capsys, *store, "mounts")[1]
        assert run(capsys, *store, "umount", lease["id"])[0] == 3        # nothing more to unmount
    finally:
        f.close()
    _check_released(store, capsys)


def _check_released(store, capsys) -> None:
    """After its last user went: the detached lease goes with cleanup where /proc proves nothing
    holds the mount; where some process cannot be looked into (a sandbox's pid 1), it stays live."""
    from flatmount.kernel import holders
    (lease,) = json.loads(run(capsys, *store, "mounts", "--json")[1])
    proven = holders.detached_mount_in_use(lease["mnt_id"], lease["detached_sb"])
    assert proven is not True
    if proven is None:
        assert lease["stale_reason"] is None
        return
    assert lease["stale_reason"] == "detached lazily and no longer in use"
    assert run(capsys, *store, "cleanup")[0] == 0
    assert json.loads(run(capsys, *store, "mounts", "--json")[1]) == []


def test_holders_find_this_process_in_a_detached_mount(store, capsys):
    """The /proc proof itself, on this process alone: a file or a cwd held, then nothing."""
    require_root()
    from flatmount.kernel import holders
    merged = run(capsys, *store, "mount", "demo")[1].strip()
    sb, mid = holders.superblock_key(merged), kmount.mount_id(merged)
    me = [str(os.getpid())]
    assert sb and sb.split()[1] == "overlay" and mid
    assert holders._mounted_anywhere(sb, me) is True
    fd = os.open(os.path.join(merged, "etc"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert run(capsys, *store, "umount", "--lazy", merged)[0] == 0
        assert holders._mounted_anywhere(sb, me) is False       # gone from every mount table ...
        assert holders._held_by_process(mid, me) is True         # ... but held by our fd
        assert holders.detached_mount_in_use(mid, sb) is True
    finally:
        os.close(fd)
    assert holders._held_by_process(mid, me) is False
    _check_released(store, capsys)


def test_a_lazily_detached_mount_in_use_keeps_its_objects_from_gc(store, tmp_path, capsys):
    require_root()
    from objects.digest import fsverity_digest

    rc, out, _ = run(capsys, *store, "mount", "demo")
    merged = out.strip()
    main_py = Path(merged, "opt/app/main.py").read_bytes()        # only demo has it
    h = fsverity_digest(main_py).hex()
    obj = tmp_path / "root" / "objects" / h[:2] / h[2:]
    cwd = os.open(os.path.join(merged, "opt/app"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert run(capsys, *store, "umount", "--lazy", merged)[0] == 0
        assert run(capsys, *store, "rmi", "demo")[0] == 0
        assert run(capsys, *store, "gc", "--grace", "0")[0] == 0
        assert run(capsys, *store, "cleanup")[0] == 0
        assert obj.exists()                                       # pinned by the detached mount
        fd = os.open("main.py", os.O_RDONLY, dir_fd=cwd)          # a file first opened now
        try:
            assert os.read(fd, 1000) == main_py
        finally:
            os.close(fd)
    finally:
        os.close(cwd)
    _check_released(store, capsys)
    released = json.loads(run(capsys, *store, "mounts", "--json")[1]) == []
    assert run(capsys, *store, "gc", "--grace", "0")[0] == 0
    assert obj.exists() != released                               # freed exactly once released


def test_mount_image_needs_objects_and_refuses_a_second_mount(store, tmp_path, capsys):
    require_root()
    rc, out, _ = run(capsys, *store, "flatten", "demo")
    image = out.split()[1]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    rc, _, err = run(capsys, "mount-image", image, str(mnt))
    assert rc == 3 and "no object directory given" in err and "--objects DIR" in err
    assert not _ours(str(mnt))
    objects = str(tmp_path / "root" / "objects")
    assert run(capsys, "mount-image", image, str(mnt), "--objects", objects)[0] == 0
    try:
        rc, _, err = run(capsys, "mount-image", image, str(mnt), "--objects", objects)
        assert rc == 3 and "already a mount point" in err
        assert len(_ours(str(mnt))) == 1                      # nothing stacked
    finally:
        kmount.umount_image(str(mnt))
    assert not _ours(str(mnt))


def test_mounts_marks_stale_leases(store, capsys):
    require_root()
    rc, out, _ = run(capsys, *store, "mount", "demo")
    merged = out.strip()
    kmount.umount_image(merged)                               # behind flatmount's back
    rc, out, _ = run(capsys, *store, "mounts", "--json")
    (lease,) = json.loads(out)
    assert lease["merged"] == merged and lease["stale_reason"] == "merged dir is not mounted"
    rc, out, _ = run(capsys, *store, "mounts")
    assert "STATE" in out and "stale (merged dir is not mounted)" in out
    assert run(capsys, *store, "cleanup")[0] == 0
    rc, out, _ = run(capsys, *store, "mounts", "--json")
    assert json.loads(out) == []


def test_objects_refs_counts_the_mount_of_a_removed_image(store, capsys):
    require_root()
    from objects.digest import fsverity_digest

    rc, out, _ = run(capsys, *store, "mount", "demo")
    merged = out.strip()
    try:
        digest = fsverity_digest(Path(merged, "opt/app/main.py").read_bytes()).hex()  # only demo has it
        assert run(capsys, *store, "rmi", "demo")[0] == 0
        rc, out, err = run(capsys, *store, "objects", "refs", digest, "--json")
        assert rc == 0, err
        users = json.loads(out)["users"]
        assert [u["kind"] for u in users if u["kind"] == "mount"] == ["mount"], users
        assert "(live)" in next(u["detail"] for u in users if u["kind"] == "mount")
    finally:
        assert run(capsys, *store, "umount", merged)[0] == 0


@pytest.mark.parametrize("bad", ["nothex", "ab/cd", "0" * 63, "zz" + "0" * 62])
def test_objects_refs_malformed_digest_is_a_usage_error(store, bad, capsys):
    rc, _, err = run(capsys, *store, "objects", "refs", bad)
    assert rc == 2 and "not an object digest" in err


def test_demo_with_root_says_the_store_is_kept(tmp_path, capsys):
    require_root()
    rc, out, _ = run(capsys, "demo", "--root", str(tmp_path / "kept"))
    assert rc == 0
    assert f"the store is kept in {tmp_path / 'kept'}" in out and "removed" not in out.splitlines()[-1]
    assert (tmp_path / "kept").is_dir()


@pytest.mark.parametrize("name, ok", [
    ("Upper", False), ("a b", False), ("x-", False), ("foo___bar", False), ("x:.tag", False),
    ("repo/", False), ("a" * 256, False), ("x:" + "t" * 129, False),
    ("example.com:5000/team/app:v1.2", True), ("localhost/app", True), ("app_1.x-y", True),
])
def test_tag_follows_the_reference_grammar(store, name, ok, capsys):
    rc, _, err = run(capsys, *store, "tag", "demo", name)
    assert rc == (0 if ok else 3), err
    if not ok:
        assert "invalid image name" in err


def test_rmi_by_id_of_an_image_with_several_names_needs_force(store, capsys):
    assert run(capsys, *store, "tag", "demo", "other")[0] == 0
    rc, out, _ = run(capsys, *store, "inspect", "demo")
    image_id = json.loads(out)["image"]["id"]
    rc, _, err = run(capsys, *store, "rmi", image_id)
    assert rc == 3 and "--force" in err
    assert run(capsys, *store, "inspect", "other")[0] == 0          # nothing removed
    rc, out, _ = run(capsys, *store, "rmi", "--force", image_id)
    assert rc == 0 and "Untagged: other:latest" in out and f"Deleted: {image_id}" in out
    assert run(capsys, *store, "inspect", image_id)[0] == 3


def test_images_created_is_the_images_own_time(store, capsys):
    rc, out, _ = run(capsys, *store, "images", "--json")
    images = json.loads(out)
    assert images
    for im in images:
        assert im["config"]["created"] and im["created"] == im["config"]["created"]
    rc, out, _ = run(capsys, *store, "images")
    assert images[0]["config"]["created"] in out


def test_additional_store_that_is_not_a_store_is_refused(tmp_path, capsys):
    (tmp_path / "graphroot" / "overlay-images").mkdir(parents=True)   # e.g. a c/storage graphroot
    rc, _, err = run(capsys, "--root", str(tmp_path / "r"), "--additional-store", str(tmp_path / "graphroot"),
                     "images")
    assert rc == 3 and "not a flatmount store" in err and "containers-storage:" in err
    (tmp_path / "empty").mkdir()                                       # an empty store is a store
    rc, _, err = run(capsys, "--root", str(tmp_path / "r"), "--additional-store", str(tmp_path / "empty"),
                     "images")
    assert rc == 0, err


def test_cstorage_missing_layer_names_the_stores_and_how_to_add_one(tmp_path):
    from flatmount.errors import NotFoundError
    from flatmount.sources.cstorage import CStorage

    (tmp_path / "g").mkdir()
    with pytest.raises(NotFoundError) as ei:
        CStorage([tmp_path / "g"]).layer("a" * 64)
    msg = str(ei.value)
    assert str(tmp_path / "g") in msg and "additionalimagestores" in msg
    assert "CONTAINERS_STORAGE_CONF" in msg and "storage.conf" in msg


# --- progress on a terminal ----------------------------------------------------------------------

@pytest.mark.parametrize("argv, label", [
    (["gc", "--dry-run"], "gc: scanning objects"),
    (["fsck"], "fsck: verifying objects"),
    (["objects", "usage"], "objects: sizing"),
    (["diff", "demo-base", "demo", "-o", "{tmp}/out.tar"], "diff: writing the layer"),
])
def test_long_operations_show_progress_on_a_terminal_only(store, tmp_path, argv, label):
    from ptyrun import run_on_tty

    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc, _, tty = run_on_tty([*store, *argv])
    assert rc == 0 and label in tty and "\x1b[K" in tty, tty
    rc, _, tty = run_on_tty(["-q", *store, *argv])            # -q: nothing but results and errors
    assert rc == 0 and label not in tty, tty
    r = subprocess.run([sys.executable, "-m", "flatmount", *store, *argv], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and label not in r.stderr     # not a terminal


def test_mkimage_json_to_stdout_is_refused(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    rc, out, err = run(capsys, "mkimage", "--json", str(tmp_path / "d"), "-")
    assert rc == 2 and "--json needs an OUT file" in err and out == ""
