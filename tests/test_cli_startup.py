"""CLI start-up: `flatmount mount`/`umount` build only their own parser, import only what they use and
write their lease rows without an fsync, and all of that changes nothing the user sees."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, require_root
from layerdirs import file_tree, store_image

from flatmount import cli
from flatmount.api import open_store
from flatmount.kernel import kmount

# argv lists as a user types them: valid ones, and every kind of usage error and help request
SAMPLES = [
    ["mount", "img"], ["--root", "/r", "mount", "img"], ["mount", "img", "--root=/r", "--json"],
    ["--root", "mount", "mount", "img"], ["--root", "umount", "mount", "img"], ["-q", "umount", "/m"],
    ["umount", "--lazy", "/m", "--runroot", "/run/x"], ["--json", "mount-image", "i", "m", "--objects", "o"],
    ["umount-image", "--force", "m"], ["objects", "refs", "ab" * 32], ["objects"], ["pull", "oci:x", "--name", "n"],
    ["--ro", "/r", "images"], ["--additional-store", "a", "--additional-store", "b", "layers"],
    ["gc", "--dry-run"], ["completion", "bash"], ["demo", "--root", "/r"], ["--", "mount", "x"],
    # usage errors: missing or unknown arguments, unknown command, an option the command does not take
    ["mount"], ["mount", "a", "b"], ["mount", "img", "--bogus"], ["nosuch"], [], ["-q", "-v", "mount", "x"],
    ["dump", "--json", "x"], ["--json", "dump", "x"], ["objects", "refs"], ["objects", "nosuch"],
    ["--root"], ["mount-image", "i"],
    # help and version
    ["-h"], ["--help", "mount"], ["mount", "--help"], ["umount", "-h"], ["objects", "refs", "-h"], ["--version"],
]


def _outcome(parse, argv: list[str]):
    """(namespace as a dict, or the exit code) and what was printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            ns = vars(parse(argv))
            ns = {k: (v.__qualname__ if callable(v) else v) for k, v in ns.items() if k != "mkimage_parser"}
        except SystemExit as e:
            ns = e.code
    return ns, out.getvalue(), err.getvalue()


def _whole(argv: list[str]) -> argparse.Namespace:
    parser = cli.build_parser()
    args = parser.parse_args(argv)
    cli._check_options(parser, args)
    return args


@pytest.mark.parametrize("argv", SAMPLES, ids=lambda a: " ".join(a) or "(none)")
def test_parse_args_answers_as_the_whole_parser(argv):
    assert _outcome(cli.parse_args, argv) == _outcome(_whole, argv)


def test_each_command_alone_parses_and_helps_as_in_the_whole_parser():
    whole = cli.build_parser()
    sub = next(a for a in whole._actions if isinstance(a, argparse._SubParsersAction))
    assert len(sub.choices) >= 20
    for name, full in sub.choices.items():
        one = cli._build_parser(name)
        assert one is not None, name
        (one_sub,) = (a for a in one._actions if isinstance(a, argparse._SubParsersAction))
        assert list(one_sub.choices) == [name]
        assert one_sub.choices[name].format_help() == full.format_help(), name
        assert one.format_usage() == whole.format_usage()
    assert cli._build_parser("nosuch") is None


def test_command_word_guess():
    assert cli._command_word(["--root", "r", "-q", "mount", "x"]) == "mount"
    assert cli._command_word(["--root=r", "umount", "x"]) == "umount"
    assert cli._command_word(["--ro", "r", "umount", "x"]) == "r"   # a wrong guess: the whole parser answers
    assert cli._command_word(["-q", "--", "mount"]) is None
    assert cli._command_word(["-h"]) is None


# --- the real commands -----------------------------------------------------------------------------

BIG = b"x" * 5000


@pytest.fixture
def store_paths(tmp_path):
    require_root()
    paths = {"root": str(tmp_path / "root"), "run": str(tmp_path / "run")}
    s = open_store(paths["root"], runroot=paths["run"])
    store_image(s, [file_tree({"etc/os-release": b"ID=t", "big": BIG}, mtime_ns=10**18)], "img", blobs=[BIG])
    s.close()
    try:
        yield paths
    finally:
        for m in reversed(kmount.mounts()):
            if m.mountpoint.startswith(str(tmp_path) + "/"):
                kmount.umount_image(m.mountpoint, lazy=True)


# a wrapper that runs the CLI as `python -m flatmount` does and then lists every module it imported
_LIST_MODULES = ("import atexit, runpy, sys\n"
                 "before = set(sys.modules)\n"
                 "atexit.register(lambda: sys.stderr.write('MODULES ' + ' '.join(sorted(set(sys.modules) - before))))\n"
                 "sys.argv = ['flatmount'] + sys.argv[1:]\n"
                 "runpy.run_module('flatmount', run_name='__main__', alter_sys=True)\n")

# what neither mount nor umount of a flattened image needs: the other areas' command modules, the
# object store (put/hash code), hashlib (the image was verified when it was written), platform,
# dataclasses and the inspect it imports (the records are flatmount.record classes), and the code that
# writes a flattened image (the image is cached: flatmount.flatten loads its writing side lazily)
NOT_NEEDED = {"flatmount.cli.maint", "flatmount.cli.diff", "flatmount.cli.image",
              "flatmount.cli.demo", "flatmount.cli.docs", "objects.store", "objects.digest",
              "hashlib", "platform", "dataclasses", "inspect", "flatmount.flatten.helper",
              "flatmount.flatten.trees", "flatmount.flatten.merge", "flatmount.image.tree",
              "flatmount.image.treecache"}


def _run(paths, *args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    cmd = [sys.executable, "-c", _LIST_MODULES, *args, "--root", paths["root"], "--runroot", paths["run"]]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = next((x for x in r.stderr.splitlines() if x.startswith("MODULES ")), "MODULES ")
    return r, set(line.split()[1:])


def _leases(paths) -> list[tuple]:
    db = sqlite3.connect(os.path.join(paths["root"], "flatmount.db"))
    try:
        return db.execute("SELECT id, merged FROM leases").fetchall()
    finally:
        db.close()


def test_mount_and_umount_import_only_their_path(store_paths):
    r, _ = _run(store_paths, "flatten", "img")
    assert r.returncode == 0, r.stderr
    r, mods = _run(store_paths, "mount", "img")
    assert r.returncode == 0, r.stderr
    merged = r.stdout.strip()
    try:
        assert open(os.path.join(merged, "big"), "rb").read() == BIG
        assert [m for _, m in _leases(store_paths)] == [merged]   # committed: another connection sees it
        assert "flatmount.mount" in mods and "flatmount.cli.mount" in mods
        assert mods & NOT_NEEDED == set()
    finally:
        r, mods = _run(store_paths, "umount", merged)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(merged) and _leases(store_paths) == []
    assert mods & (NOT_NEEDED | {"json"}) == set()   # (mount reads the image's config: it needs json)


def test_lease_rows_are_written_without_fsync_or_tmp_cleaning(store_paths, monkeypatch):
    """A lease row needs no fsync and no first-write cleaning of tmp/ (flatmount.mount._LEASE_WRITE):
    every write of a mount and unmount of a flattened image asks for neither; other writes still do."""
    from flatmount import mount as fm
    from flatmount.flatten import flatten_image
    from flatmount.store.core import Store

    store = open_store(store_paths["root"], runroot=store_paths["run"])
    flatten_image(store, "img")   # cached from now on
    store.close()
    calls = []
    real = Store.transaction

    def recording(self, durable=True, clean=True):
        calls.append((durable, clean))
        return real(self, durable, clean)

    monkeypatch.setattr(Store, "transaction", recording)
    store = open_store(store_paths["root"], runroot=store_paths["run"])
    lease = fm.mount_image_ref(store, "img")
    try:
        assert open(os.path.join(lease.merged, "big"), "rb").read() == BIG
        assert _leases(store_paths) == [(lease.id, lease.merged)]   # committed, seen by another connection
        assert not store._write_opened and store._objects is None    # tmp/ not cleaned, no object store
    finally:
        fm.umount(store, lease.id)
    assert _leases(store_paths) == []
    assert calls and set(calls) == {(False, False)}, calls
    store.tag("img", "other")
    assert calls[-1] == (True, True)
    store.close()


def test_an_interrupt_raised_in_a_weakref_callback_is_not_lost():
    """A SIGINT whose handler runs inside a weakref callback raises there, and Python drops it
    ("Exception ignored in"): the CLI delivers it again, so a stalled command still stops."""
    code = textwrap.dedent("""
        import signal, sys, time, weakref
        from flatmount.cli import keep_interrupts
        signal.signal(signal.SIGINT, signal.default_int_handler)   # as at a terminal, however started
        keep_interrupts()

        class T:
            pass

        def callback(_ref):
            raise KeyboardInterrupt

        t = T()
        r = weakref.ref(t, callback)
        try:
            del t   # the interrupt is raised in the callback: dropped by Python
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                time.sleep(0.01)
            print("lost")
        except KeyboardInterrupt:
            print("interrupted")
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout.strip() == "interrupted", (p.stdout, p.stderr)
