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
from conftest import ROOT, cli_modules, require_root
from hypothesis import given, settings
from hypothesis import strategies as st
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
    # what the parser-free path (flatmount.cli.fastparse) answers, and what it must leave to argparse
    ["--root=/r", "--runroot", "/x", "-q", "--json", "mount", "img", "--json", "--config", "c"],
    ["--root", "/a", "mount", "img", "--root", "/b"], ["--root", "/a", "--root", "/b", "mount", "img"],
    ["--additional-store", "a", "mount", "img", "--additional-store", "b", "--additional-store=c"],
    ["--additional-store", "a", "mount", "img"], ["-v", "umount", "/m", "--force", "--lazy", "--lazy"],
    ["--debug", "--quiet", "umount", "/m"], ["--quiet", "-q", "umount", "--root=", "/m"], ["umount", ""],
    ["mount", "--root", "-x", "img"], ["mount", "img", "--json=1"], ["umount", "/m", "--lazy=yes"],
    ["mount", "img", "--roo", "/r"], ["mount", "-", "--root", "/r"], ["mount", "img", "--", "x"],
    ["mount", "-1"], ["--lazy", "umount", "/m"], ["mount", "img", "-q"], ["umount", "/m", "-h"],
    ["mount", "img", "--version"], ["mount", "img", "--root"], ["-qv", "mount", "img"], ["mount", "a=b"],
    ["umount", "--force", "/m", "x"], ["mount", "img", "--lazy"], ["mount", "img", "--additional-store"],
    ["run", "bb"], ["run", "bb", "--"], ["run", "--rm", "bb", "--", "sh", "-c", "echo x"], ["run", "bb", "--", "--rm"],
    ["run", "-e", "A=1", "--env=B=2", "-e", "C", "-v", "/h:/c:ro", "--tmpfs", "/t", "-w", "/w", "-u", "1:2", "bb"],
    ["--root", "/r", "run", "--root", "/s", "--json", "--name", "x", "--name", "y", "bb", "--", "true"],
    ["run", "--net", "none", "--network=host", "--runtime", "crun", "--entrypoint", "sh", "--hostname", "h", "bb"],
    ["run", "-d", "--detach", "-t", "--tty", "-i", "--interactive", "bb", "--", "top"],
    ["run", "--net", "bogus", "bb"], ["run", "--runtime=docker", "bb"], ["run", "-it", "bb"], ["run", "bb", "true"],
    ["run", "bb", "--rm"], ["run", "bb", "--rm", "--", "true"], ["run", "--", "bb"], ["run"], ["run", "-e", "-x", "bb"],
    ["run", "--name=", "bb"], ["run", "--rm=1", "bb"], ["run", "--ne", "none", "bb"], ["run", "bb", "-h"],
    ["-q", "run", "bb", "--", "-q"], ["run", "-q", "bb"], ["run", "bb", "--", "--", "x"],
]


def _outcome(parse, argv: list[str]):
    """(namespace as a dict, or the exit code) and what was printed.  The words after `run`'s or
    `bundle`'s positionals count as what the command makes of them (flatmount.cli.run.split_late:
    argparse's handling of a `--` there changed between Python versions)."""
    from flatmount.cli.run import split_late

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            ns = vars(parse(argv))
            ns = {k: (v.__qualname__ if callable(v) else v) for k, v in ns.items() if k != "mkimage_parser"}
            if "cmd" in ns:
                ns["cmd"] = split_late(list(ns["cmd"]))
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


_WORDS = ["mount", "umount", "img", "/m", "", "-", "--", "-q", "-v", "--quiet", "--debug", "--json", "--json=1",
          "--root", "--root=/r", "--runroot", "--config=c", "--additional-store", "--additional-store=a",
          "--lazy", "--force", "--lazy=1", "--roo", "-h", "--help", "--version", "-1", "a=b", "mount-image", "-x",
          "run", "--rm", "-d", "-t", "-it", "--name", "--net", "none", "--net=host", "--network", "bogus", "-e",
          "--env=K=V", "--tmpfs", "--runtime", "crun", "--entrypoint", "-w", "-u", "--volume", "true", "bundle",
          "-e=X", "-eX", "-u=1", "--tty=1"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_WORDS), max_size=8))
def test_fast_path_answers_as_the_whole_parser_on_generated_command_lines(argv):
    """Whatever the words, `parse_args` (which tries the parser-free path first) gives what argparse
    gives: the same namespace, or the same exit code and messages."""
    assert _outcome(cli.parse_args, argv) == _outcome(_whole, argv)


def test_fast_path_takes_what_argparse_defines_for_mount_umount_and_run():
    """flatmount.cli.fastparse's option tables are the argparse definitions of its commands (an option
    added to one and not the other fails here), and it answers plain command lines itself."""
    from flatmount.cli import fastparse

    def options(parser):
        return {(o, a.dest, a.nargs, type(a).__name__) for a in parser._actions for o in a.option_strings}

    whole = cli.build_parser()
    assert {x for x in options(whole) if x[0] not in ("--version", "-h", "--help")} == \
        {(o, d, None if d in ("root", "runroot", "config", "additional_stores") else 0,
          "_AppendAction" if d == "additional_stores" else "_StoreAction" if d in fastparse._STORE_VALUES.values()
          else "_StoreTrueAction") for o, d in {**fastparse._GLOBAL_FLAGS, **fastparse._STORE_VALUES}.items()}
    sub = next(a for a in whole._actions if isinstance(a, argparse._SubParsersAction))
    for name, (positionals, flags, func, area) in fastparse.COMMANDS.items():
        p = sub.choices[name]
        remainder = fastparse.REMAINDER.get(name)
        assert [a.dest for a in p._actions if not a.option_strings] == [*positionals, *([remainder] if remainder else [])]
        for a in p._actions:
            if not a.option_strings:
                assert (a.nargs, a.type) == ((argparse.REMAINDER, None) if a.dest == remainder else (None, None))
        values = fastparse.VALUES.get(name, {})
        own = {"--json": "json", **fastparse._STORE_VALUES, **flags, **{o: v[0] for o, v in values.items()}}
        assert {o: a.dest for a in p._actions for o in a.option_strings if a.dest != "help"} == own
        for a in p._actions:
            for o in a.option_strings:
                if o in values:
                    dest, default, choices, repeated = values[o]
                    assert (a.default, a.choices, type(a).__name__, a.nargs, a.type) == \
                        (list(default) if repeated else default, choices,
                         "_AppendAction" if repeated else "_StoreAction", None, None), o
                elif o in flags:
                    assert type(a).__name__ == "_StoreTrueAction", o
        assert p.get_default("func").__name__ == func
        assert p.get_default("func").__module__ == "flatmount.cli." + area
    assert fastparse.parse_simple(["mount", "img", "--root", "/r"]) is not None
    assert fastparse.parse_simple(["umount", "/m", "--lazy", "-h"]) is None
    assert fastparse.parse_simple(["run", "--rm", "-e", "A=1", "bb", "--", "true"]) is not None
    assert fastparse.parse_simple(["run", "-it", "bb"]) is None and fastparse.parse_simple(["run", "bb", "true"]) is None


def test_words_after_the_image_split_into_options_and_command():
    from flatmount.cli.run import split_late

    assert split_late([]) == ([], [])
    assert split_late(["true"]) == ([], ["true"])
    assert split_late(["echo", "--", "hi"]) == ([], ["echo", "--", "hi"])   # a command's own `--`
    assert split_late(["--", "echo", "--", "hi"]) == ([], ["echo", "--", "hi"])   # (`--` kept by argparse)
    assert split_late(["--net", "none", "--", "sh", "--", "x"]) == (["--net", "none"], ["sh", "--", "x"])
    assert split_late(["--net", "none"]) == (["--net", "none"], [])
    args = cli.parse_args(["run", "bb", "--", "sh", "-c", "x", "--", "y"])
    from flatmount.cli.run import options_from

    assert options_from(args).command == ("sh", "-c", "x", "--", "y")


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


# what neither mount nor umount of a flattened image needs: argparse (a plain command line is parsed
# by flatmount.cli.fastparse), the other areas' command modules, the
# object store (put/hash code), hashlib (the image was verified when it was written), platform,
# dataclasses and the inspect it imports (the records are flatmount.record classes), the code that
# writes a flattened image (the image is cached: flatmount.flatten loads its writing side lazily),
# json (a mount needs the image's chain, not its config), the sqlite3 package and the datetime it
# imports (flatmount.store.sqlite loads the C module alone), pathlib and the re, fnmatch and
# urllib.parse behind it (a store's paths are str until a Path is asked for), re for a short name
# (flatmount.reference.is_short), typing.  The wrapper runs without site (-S), so that no module
# the environment preloads (a .pth file's) hides one of these.
NOT_NEEDED = {"pathlib", "re", "fnmatch", "urllib.parse", "typing",
              "json", "sqlite3", "sqlite3.dbapi2", "datetime", "flatmount.cli.maint", "flatmount.cli.diff", "flatmount.cli.image",
              "flatmount.cli.demo", "flatmount.cli.docs", "objects.store", "objects.digest",
              "hashlib", "platform", "dataclasses", "inspect", "flatmount.flatten.helper",
              "flatmount.flatten.trees", "flatmount.flatten.merge", "flatmount.image.tree",
              "flatmount.image.treecache", "argparse", "gettext", "locale", "flatmount.cli.parser"}


def _run(paths, *args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    return cli_modules(*args, "--root", paths["root"], "--runroot", paths["run"])


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
        # the CLI closed its store: the WAL was checkpointed into the DB and removed, as at every close
        assert not os.path.exists(os.path.join(store_paths["root"], "flatmount.db-wal"))
        assert "flatmount.mount" in mods and "flatmount.cli.mount" in mods
        assert mods & NOT_NEEDED == set()
    finally:
        r, mods = _run(store_paths, "umount", merged)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(merged) and _leases(store_paths) == []
    assert mods & NOT_NEEDED == set()


# what a mount that first flattens its image (a new image's first container start) needs beyond a
# cached one's: the code that writes a flattened image; hashlib for its name only where the compiled
# SHA-256 stream is not usable (objects.sha256: no SHA-NI, or not built)
WRITES_THE_IMAGE = {"flatmount.flatten.trees", "flatmount.flatten.merge", "flatmount.image.tree",
                    "flatmount.image.treecache"}


def test_a_first_mount_writes_its_image_without_the_heavy_modules(store_paths):
    """The first mount of an image flattens it (nothing cached): the writing side is imported then,
    but still no typing, re, pathlib, tempfile (and the random, shutil, bz2, lzma behind it), json or
    argparse: ~30 ms of a new process without site, where the environment preloads none of them."""
    r, mods = _run(store_paths, "mount", "img")
    assert r.returncode == 0, r.stderr
    merged = r.stdout.strip()
    try:
        assert open(os.path.join(merged, "big"), "rb").read() == BIG
        assert "flatmount.image.writer" in mods and "flatmount.flatten.imagefile" in mods   # it did flatten
        from objects.sha256 import STREAM

        assert mods & (NOT_NEEDED - WRITES_THE_IMAGE - (set() if STREAM else {"hashlib"})) == set()
        assert mods & {"tempfile", "random", "shutil", "enum"} == set()
    finally:
        r, _ = _run(store_paths, "umount", merged)
    assert r.returncode == 0, r.stderr


def test_a_pull_imports_no_heavy_modules(tmp_path):
    """A pull (the example OCI layout into a new store) needs neither dataclasses (inspect, ast, dis
    behind it), tempfile nor pathlib.  (platform, a dozen regexes compiled at import, comes only
    with zstandard, for the example's zstd layers; shutil with argparse.)"""
    require_root()
    r, mods = cli_modules("--root", str(tmp_path / "root"), "--runroot", str(tmp_path / "run"), "pull",
                          f"oci:{ROOT}/flatmount/examples/demo-oci:demo", "--name", "demo")
    assert r.returncode == 0, r.stderr
    assert "flatmount.sources.oci" in mods and "flatmount.store.batch" in mods
    assert mods & {"dataclasses", "inspect", "tempfile", "pathlib"} == set()


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
        import signal, sys, threading, time, weakref
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
            # then blocked in a wait that only a real signal ends (as a pull waiting for a stalled
            # layer is): a handler merely scheduled would run only when the wait ends by itself
            start = time.monotonic()
            threading.Event().wait(10)
            print("lost")
        except KeyboardInterrupt:
            print("interrupted" if time.monotonic() - start < 5 else "late")
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout.strip() == "interrupted", (p.stdout, p.stderr)


# --- the end of a command (flatmount.cli.run: the interpreter's teardown is skipped when safe) ------

_RUN = textwrap.dedent("""
    import atexit, os, sys, threading, time

    class Teardown:
        def __del__(self, write=os.write):   # (the module's globals may be gone by then)
            write(1, b"teardown ran\\n")

    def at_exit():
        print("atexit ran")
        garbage = Teardown()
        garbage.cycle = garbage   # freed only by a collection: the teardown's final ones

    what = sys.argv[1]
    if what != "plain":
        atexit.register(at_exit)
    if what == "thread":   # still running when the command ends: the interpreter must join it
        threading.Thread(target=lambda: (time.sleep(2), print("thread ran"))).start()
    sys.argv = ["flatmount", *sys.argv[2:]]
    from flatmount.cli import run
    run()
""")


@pytest.mark.parametrize("what", ["plain", "atexit", "thread"])
def test_run_ends_the_process_as_the_interpreter_would(tmp_path, what):
    """The output, the exit code and the atexit callbacks are what a normal exit gives; the teardown
    itself (the final collections, objects freed one by one) is skipped, unless a thread still runs."""
    where = ["--root", str(tmp_path / "root"), "--runroot", str(tmp_path / "run")]
    for command, code in ((["mounts"], 0), (["mount", "nosuch"], 3)):
        p = subprocess.run([sys.executable, "-c", _RUN, what, *command, *where], capture_output=True,
                           text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert p.returncode == code, p.stderr
        lines = p.stdout.splitlines()
        if code == 0:
            assert lines[0].split() == ["LEASE", "IMAGE", "DIGEST", "PID", "CREATED", "STATE", "MERGED"]
        else:
            assert p.stderr.startswith("flatmount: "), p.stderr
        assert ("atexit ran" in lines) == (what != "plain")
        assert ("thread ran" in lines) == ("teardown ran" in lines) == (what == "thread"), lines
