"""flatmount.store.core (+ pull recording, CLI): config, records, names, rmi, locks, crash safety, read-only stores."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flatmount.api import open_store
from flatmount.cli import main
from flatmount.errors import LayerError, NotFoundError, ReadOnlyStoreError, StoreError
from flatmount.image.tree import lookup
from flatmount.pull import TerminalProgress, pull
from flatmount.store import reftable
from flatmount.store.core import Store
from flatmount.store.names import name_candidates, normalise_name
from flatmount.store.records import SCHEMA_VERSION, chain_id
from tests.conftest import require_root
from tests.tarbuild import Tar, bad_tars, check_consistent, compress, make_oci, store_state

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "flatmount" / "examples" / "demo-oci"


def mkstore(path: Path, **kw) -> Store:
    kw.setdefault("additional", [])
    return open_store(path, runroot=path.parent / "run", config=os.devnull, **kw)


@pytest.fixture
def store(tmp_path):
    s = mkstore(tmp_path / "store")
    yield s
    s.close()


def tar_file(tmp_path: Path, name: str, files: dict[str, bytes], kind: str = "none") -> str:
    t = Tar()
    for path, data in files.items():
        t.file(path, data)
    p = tmp_path / name
    p.write_bytes(compress(t.bytes(), kind))
    return str(p)


# --- configuration ---------------------------------------------------------------------------------

def test_config_file_env_and_overrides(tmp_path, monkeypatch):
    conf = tmp_path / "storage.conf"
    conf.write_text(textwrap.dedent(f"""
        [storage]
        driver = "ignored"
        root = "{tmp_path}/r"
        runroot = "{tmp_path}/run"
        [storage.options]
        additionalimagestores = ["{tmp_path}/a1", "{tmp_path}/a2"]
    """))
    (tmp_path / "a1").mkdir()
    (tmp_path / "a2").mkdir()
    s = open_store(config=conf)
    assert (s.root, s.runroot) == (tmp_path / "r", tmp_path / "run")
    assert [a.root for a in s.additional] == [tmp_path / "a1", tmp_path / "a2"]
    assert all(a.readonly and a.is_additional for a in s.additional)
    assert s.object_dirs() == [str(tmp_path / p / "objects") for p in ("r", "a1", "a2")]
    monkeypatch.setenv("FLATMOUNT_CONFIG", str(conf))
    s = open_store(root=tmp_path / "explicit", additional=[tmp_path / "a2"])
    assert s.root == tmp_path / "explicit" and s.runroot == tmp_path / "run"
    assert [a.root for a in s.additional] == [tmp_path / "a2"]
    assert not (tmp_path / "r").exists() and not (tmp_path / "explicit").exists()  # nothing created


def test_config_defaults(tmp_path, monkeypatch):
    import flatmount.store.config as st

    monkeypatch.setattr(st, "DEFAULT_CONFIG", str(tmp_path / "none.conf"))
    monkeypatch.delenv("FLATMOUNT_CONFIG", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    s = open_store()
    assert (str(s.root), str(s.runroot)) == ("/var/lib/flatmount", "/run/flatmount")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdgrun"))
    s = open_store()
    assert (s.root, s.runroot) == (tmp_path / "data" / "flatmount", tmp_path / "xdgrun" / "flatmount")
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert open_store().root == tmp_path / "home" / ".local" / "share" / "flatmount"


@pytest.mark.parametrize("text, message", [
    ("[storage\nroot=", "not valid TOML"),
    ('[storage]\nroot = "relative/path"', "must be an absolute path"),
    ('[storage.options]\nadditionalimagestores = "/x"', "must be a list"),
])
def test_bad_config(tmp_path, text, message):
    conf = tmp_path / "c.conf"
    conf.write_text(text)
    with pytest.raises(StoreError, match=message):
        open_store(config=conf)


_TOML_HEADERS = ["[storage]", "[storage.options]", "[ storage ]", "[a.b]", "[a]", "[[x]]", "[storage] # c",
                 "[storage]x", "[a..b]", "[]", "[storage.options.x]", "[é]"]
_TOML_KEYS = ["root", "runroot", "graphroot", "additionalimagestores", "driver", "options", "a.b", "'q'",
              "1", "-_", "b", "x y", ""]
_TOML_VALUES = ['"/x"', "'/y'", '"a\\"b"', '"a\\\\b"', '"""m"""', "[]", '["/a", "/b"]', "[ '/a' ,]",
                "[,]", '["a" "b"]', "1", "true", "{}", '"#"', '"é"', '"\t"', "'a\"b'", '"', '["a"',
                '["a", # c ]', "", '"/z" "/w"', "[[]]"]
_TOML_TAILS = ["", " # c", "#c", " x", "\t", " # \x01"]


@settings(max_examples=600, deadline=None)
@given(st.lists(st.one_of(
    st.sampled_from(_TOML_HEADERS),
    st.tuples(st.sampled_from(_TOML_KEYS), st.sampled_from([" = ", "=", " =", " "]), st.sampled_from(_TOML_VALUES),
              st.sampled_from(_TOML_TAILS)).map("".join),
    st.sampled_from(["", "# comment", "  # indented", "\x01", "\r", "   ", "\t# tab"])), max_size=8),
    st.sampled_from(["\n", "\r\n"]), st.booleans())
def test_plain_config_reads_as_tomllib_reads_it(lines, newline, bad_utf8):
    """`simple_toml` (the config file's plain form, without tomllib's import) gives what tomllib gives,
    or None (tomllib then reads the file); never a result for a file tomllib refuses."""
    import tomllib

    from flatmount.store.config import simple_toml

    raw = newline.join(lines).encode() + (b"\n# \xff" if bad_utf8 else b"")
    try:
        want = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        want = None
    got = simple_toml(raw)
    assert got is None or got == want


def test_plain_config_is_read_without_tomllib(tmp_path):
    """A config file in the documented form is read without importing tomllib (and re, enum behind
    it): a new process's store opening, where nothing preloads them."""
    conf = tmp_path / "storage.conf"
    conf.write_text(textwrap.dedent(f"""
        # the operator's stores
        [storage]
        root = "{tmp_path}/r"    # primary
        runroot = '{tmp_path}/run'
        [storage.options]
        additionalimagestores = ["{tmp_path}/a1", "{tmp_path}/a2",]
    """))
    code = ("import sys\nfrom flatmount.store.config import load_config\nc = load_config(sys.argv[1])\n"
            "print(c.root, c.runroot, *c.additional, 'tomllib' in sys.modules, 're' in sys.modules)")
    out = subprocess.run([sys.executable, "-S", "-c", code, str(conf)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}).stdout.split()
    assert out == [f"{tmp_path}/r", f"{tmp_path}/run", f"{tmp_path}/a1", f"{tmp_path}/a2", "False", "False"]


def test_missing_explicit_config_and_additional_store(tmp_path, monkeypatch):
    with pytest.raises(StoreError, match="does not exist"):
        open_store(config=tmp_path / "missing.conf")
    monkeypatch.setenv("FLATMOUNT_CONFIG", str(tmp_path / "missing.conf"))
    with pytest.raises(StoreError, match="does not exist"):
        open_store(root=tmp_path / "r")
    with pytest.raises(StoreError, match="additional store .* does not exist"):
        open_store(tmp_path / "r", additional=[tmp_path / "nope"], config=os.devnull)
    with pytest.raises(StoreError, match="is the primary"):
        open_store(tmp_path / "r", additional=[tmp_path / "r"], config=os.devnull)


# --- creation, schema ------------------------------------------------------------------------------

def test_reads_create_nothing_first_write_creates_layout(tmp_path):
    s = mkstore(tmp_path / "store")
    assert s.images() == [] and s.layers() == []
    with pytest.raises(NotFoundError, match="'nothing'"):
        s.resolve_image("nothing")
    assert not (tmp_path / "store").exists()
    pull(s, f"oci:{DEMO}:demo")
    modes = {p: os.stat(tmp_path / "store" / p).st_mode & 0o7777
             for p in ("", "objects", "layers", "images", "tmp")}
    assert modes == {"": 0o700, "objects": 0o755, "layers": 0o755, "images": 0o755, "tmp": 0o700}
    db = s.connect()
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    s.close()
    s2 = mkstore(tmp_path / "store")  # reopening is idempotent
    assert [i.id for i in s2.images()] == [i.id for i in s.images()]
    s2.close()


def test_newer_schema_is_refused(tmp_path):
    s = mkstore(tmp_path / "store")
    s.connect().execute("PRAGMA user_version=99")
    s.close()
    with pytest.raises(StoreError, match="schema version 99"):
        mkstore(tmp_path / "store").connect()
    with pytest.raises(StoreError, match="schema version 99"):
        mkstore(tmp_path / "p", additional=[tmp_path / "store"]).images()


def test_connect_survives_a_caller_closing_it(store):
    store.connect().close()
    assert store.connect().execute("SELECT count(*) FROM layers").fetchone() == (0,)


def test_transaction_not_durable_only_for_its_own_commit(store):
    """`durable=False` (a flattened image's row) commits without the WAL fsync; the connection is
    back to synchronous=FULL afterwards, also when the block raised."""
    db = store.connect()
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2
    with store.transaction(durable=False) as tx:
        assert tx.execute("PRAGMA synchronous").fetchone()[0] == 1
        tx.execute("INSERT INTO names(name, image_id) VALUES ('a', 'x')")
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2
    with pytest.raises(RuntimeError), store.transaction(durable=False) as tx:
        tx.execute("INSERT INTO names(name, image_id) VALUES ('b', 'y')")
        raise RuntimeError
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert [r[0] for r in db.execute("SELECT name FROM names")] == ["a"]
    with store.transaction() as tx:
        assert tx.execute("PRAGMA synchronous").fetchone()[0] == 2


# --- names and resolution --------------------------------------------------------------------------

def test_name_rules():
    assert normalise_name("foo") == "foo:latest"
    assert normalise_name("localhost:5000/foo") == "localhost:5000/foo:latest"
    assert normalise_name("foo:1.0") == "foo:1.0"
    assert normalise_name("foo@sha256:" + "a" * 64) == "foo@sha256:" + "a" * 64
    assert name_candidates("foo") == ["foo", "foo:latest", "localhost/foo:latest"]
    assert name_candidates("quay.io/x/y:1") == ["quay.io/x/y:1"]
    for bad in ("", "a b", "-x", "a\nb"):
        with pytest.raises(StoreError):
            normalise_name(bad)
    assert chain_id(None, "sha256:" + "ab" * 32) == "ab" * 32
    assert chain_id("p", "sha256:" + "ab" * 32) == hashlib.sha256(b"p+" + b"ab" * 32).hexdigest()


def test_resolve_image(store, tmp_path):
    a = pull(store, tar_file(tmp_path, "a.tar", {"a": b"a"}), "foo").image
    b = pull(store, tar_file(tmp_path, "b.tar", {"b": b"b"}), "localhost/bar:2").image
    assert store.resolve_image("foo") == store.resolve_image("foo:latest") == a
    assert store.resolve_image("localhost/bar:2") == store.resolve_image("bar:2") == b
    assert store.resolve_image(a.id) == store.resolve_image("sha256:" + a.id) == a
    common = os.path.commonprefix([a.id, b.id])
    assert store.resolve_image(a.id[: len(common) + 3]) == a
    with pytest.raises(NotFoundError, match="'zzz' not found"):
        store.resolve_image("zzz")
    with pytest.raises(NotFoundError, match="not found"):
        store.resolve_image(a.id[:2])  # too short to be a prefix
    if len(common) >= 3:
        with pytest.raises(NotFoundError, match="ambiguous"):
            store.resolve_image(common)


def test_tag_and_rmi(store, tmp_path):
    base = {"etc/base": b"B" * 300}
    one = pull(store, f"oci:{DEMO}:demo").image
    two_path = tmp_path / "two"
    t1, t2 = Tar(), Tar(root=False)
    t1.file("x", b"x" * 200)
    t2.file("y", b"y" * 200)
    make_oci(two_path, [(t1.bytes(), "gzip"), (t2.bytes(), "zstd")], tag="two")
    two = pull(store, f"oci:{two_path}:two").image
    shared_path = tmp_path / "shared"
    t3 = Tar(root=False)
    t3.file("z", b"z" * 200)
    make_oci(shared_path, [(t1.bytes(), "gzip"), (t3.bytes(), "gzip")], tag="shared")
    shared = pull(store, f"oci:{shared_path}:shared").image
    del base
    # tag adds a name; tagging an existing name moves it
    assert store.tag("two", "alias").names == ("alias:latest", "two:latest")
    assert store.tag("demo", "alias").names == ("alias:latest", "demo:latest")
    assert store.resolve_image("alias").id == one.id
    # rmi by name untags while other names remain
    r = store.remove_image("alias")
    assert (r.untagged, r.deleted) == (("alias:latest",), False)
    assert store.resolve_image("demo").id == one.id
    # removing `two` removes its top layer but keeps the base shared with `shared`
    objects_before = sorted(p for p in (store.root / "objects").rglob("*") if p.is_file())
    chain = [x.id for x in store.layer_chain(two.top_layer)]
    r = store.remove_image("two")
    assert r.deleted and r.layers_removed == (chain[1],)
    assert not os.path.exists(store.layer_image_path(chain[1]))
    assert store.layer(chain[0]).id == chain[0]
    with pytest.raises(NotFoundError):
        store.layer(chain[1])
    assert reftable.objects_of(store.connect(), "layer:" + chain[1]) == []
    assert sorted(p for p in (store.root / "objects").rglob("*") if p.is_file()) == objects_before
    # by id: every name goes, and now the base layer too
    r = store.remove_image(shared.id)
    assert r.deleted and r.untagged == ("shared:latest",) and len(r.layers_removed) == 2
    assert [i.id for i in store.images()] == [one.id]
    check_consistent(store.root)
    with pytest.raises(NotFoundError):
        store.remove_image("two")


# --- locks and cleaning ----------------------------------------------------------------------------

def _try_flock(path: Path, op: int) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_gc_lock(store):
    lock = store.root / "gc.lock"
    with store.gc_lock(shared=True):
        assert _try_flock(lock, fcntl.LOCK_SH)
        assert not _try_flock(lock, fcntl.LOCK_EX)
    with store.gc_lock(shared=False):
        assert not _try_flock(lock, fcntl.LOCK_SH)
    assert _try_flock(lock, fcntl.LOCK_EX)


def test_clean_tmp(tmp_path):
    s = mkstore(tmp_path / "store")
    pull(s, f"oci:{DEMO}:demo")
    s.close()
    root = tmp_path / "store"
    busy = mkstore(root)
    busy.ensure_writable()  # its own write-open clean happens now, before the leftovers exist
    (root / "tmp" / "import-1-dead").mkdir()
    (root / "tmp" / "import-1-dead" / "f").write_bytes(b"x")
    (root / "tmp" / "image-x.tmp").write_bytes(b"x")
    (root / "objects" / ".tmp" / "123-ab-0").write_bytes(b"x")
    orphan = root / "layers" / ("ab" * 32 + ".erofs")
    orphan.write_bytes(b"x")
    keep = sorted(os.listdir(root / "layers"))
    # another writer is active (holds gc.lock shared): only old, unlocked tmp entries go
    with busy.gc_lock(shared=True):
        live = root / "tmp" / "import-2-live"
        live.mkdir()
        fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        old = time.time() - 3 * 86400
        for p in (live, root / "tmp" / "import-1-dead"):
            os.utime(p, (old, old))
        s = mkstore(root)
        s.ensure_writable()
        assert sorted(os.listdir(root / "tmp")) == ["image-x.tmp", "import-2-live"]
        assert orphan.exists()
        os.close(fd)
        s.close()
    # nobody writing: everything stale goes at the next write-open
    s = mkstore(root)
    s.ensure_writable()
    assert os.listdir(root / "tmp") == [] and os.listdir(root / "objects" / ".tmp") == []
    assert not orphan.exists() and sorted(os.listdir(root / "layers")) == [n for n in keep if n != orphan.name]
    check_consistent(root)
    s.close()
    busy.close()


# --- bad input through pull: error and an unchanged store -------------------------------------------

@pytest.mark.parametrize("case", bad_tars(), ids=lambda c: c[0])
def test_bad_tar_pull_leaves_store_unchanged(store, tmp_path, case):
    _name, data, message = case
    pull(store, f"oci:{DEMO}:demo")
    before = store_state(store.root)
    (tmp_path / "bad.tar").write_bytes(data)
    with pytest.raises(LayerError, match=message):
        pull(store, f"tar:{tmp_path / 'bad.tar'}", "bad")
    assert store_state(store.root) == before


@pytest.mark.parametrize("error_at", ["end", "truncated"])
def test_bad_tar_with_many_small_files_leaves_store_unchanged(store, tmp_path, monkeypatch, error_at):
    """A layer failing after objects.bulk helpers stored many of its files: they are stopped and the
    objects they created are rolled back."""
    import objects.bulk

    started = []
    real_start = objects.bulk.BulkWriter._start
    monkeypatch.setattr(objects.bulk.BulkWriter, "_start", lambda self: started.append(1) or real_start(self))
    pull(store, f"oci:{DEMO}:demo")
    before = store_state(store.root)
    t = Tar()
    for i in range(1000):
        t.file(f"d/f{i}", os.urandom(200 + i))
    if error_at == "end":
        t.file("d/f0", b"again")  # duplicate entry: detected after every file was stored
        data = t.bytes()
    else:
        data = t.bytes()[: len(t.bytes()) * 2 // 3 + 100]
    (tmp_path / "bad.tar").write_bytes(data)
    with pytest.raises(LayerError, match="duplicate entry" if error_at == "end" else "truncated|ends inside"):
        pull(store, f"tar:{tmp_path / 'bad.tar'}", "bad")
    assert started == [1]
    assert store_state(store.root) == before
    me = str(os.getpid())
    helpers = [p for p in os.listdir("/proc") if p.isdigit() and _ppid(p) == me and
               b"objects.bulk" in _cmdline(p)]
    assert helpers == []


def _ppid(pid: str) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[1]
    except OSError:
        return None


def _cmdline(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def test_bad_sources(store, tmp_path):
    with pytest.raises(LayerError, match="unsupported transport 'ftp'"):
        pull(store, "ftp://alpine")
    with pytest.raises(LayerError, match="does not exist"):
        pull(store, str(tmp_path / "nothing"))
    with pytest.raises(LayerError, match="missing path"):
        pull(store, "oci:")


# --- tar and dir sources -----------------------------------------------------------------------------

def test_pull_tar_sources(store, tmp_path):
    files = {"etc/conf": b"c" * 100, "etc/small": b"s"}
    ids = set()
    for kind in ("none", "gzip", "zstd"):
        r = pull(store, "tar:" + tar_file(tmp_path, f"l.{kind}", files, kind), "t")
        ids.add(r.image.id)
        tree = store.layer_tree(r.image.top_layer)
        assert lookup(tree, "etc/conf").size == 100 and lookup(tree, "etc/small").content == b"s"
    assert len(ids) == 1  # same uncompressed tar, same diff_id, same synthesized config
    assert r.present == (r.image.top_layer,)
    assert r.image.config["rootfs"]["diff_ids"] == ["sha256:" + r.image.top_layer]


def test_layer_tree_cache(store, tmp_path):
    """A layer's tree cache is written at import beside its image and gives the image's tree; a
    damaged or missing one falls back to reading the image; rmi removes it, gc removes an orphan."""
    from flatmount.gc import gc
    from flatmount.image.reader import read_tree

    t = Tar()
    t.file("etc/conf", b"c" * 100)
    t.file("etc/small", b"s")
    t.whiteout(".wh.gone")
    t.file("fresh/x", b"x" * 70)
    t.whiteout("fresh/.wh..wh..opq")
    t.hardlink("etc/link", "etc/conf")
    src = tmp_path / "l.tar"
    src.write_bytes(t.bytes())
    lid = pull(store, f"tar:{src}", "cached").image.top_layer
    image = Path(store.layer_image_path(lid))
    cache = image.with_suffix(".tree")
    assert cache.is_file()
    store.clean_tmp()                                   # leftovers of killed imports go, caches stay
    assert cache.is_file()
    want = read_tree(str(image))
    assert store.layer_tree(lid) == want
    data = bytearray(cache.read_bytes())
    data[-5] ^= 0xFF
    cache.write_bytes(bytes(data))                      # damaged: checksum fails, the image is read
    assert store.layer_tree(lid) == want
    cache.unlink()
    assert store.layer_tree(lid) == want                # missing
    pull(store, f"tar:{src}", "again")                  # (present: nothing rewritten)
    orphan = image.with_name("ab" * 32 + ".tree")
    orphan.write_bytes(b"orphan")
    gc(store, grace_s=0)
    assert not orphan.exists() and image.exists()
    cache.write_bytes(bytes(data))
    store.remove_image("cached")
    store.remove_image("again")
    assert not image.exists() and not cache.exists()


def test_pull_dir_source(store, tmp_path):
    require_root()
    from flatmount.image.dump import dump_bytes

    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "big").write_bytes(b"B" * 1000)
    (src / "etc" / "small").write_bytes(b"s")
    os.symlink("big", src / "etc" / "link")
    os.mknod(src / "etc" / "gone", 0o600 | 0o020000, os.makedev(0, 0))   # overlay whiteout
    (src / "opt").mkdir()
    os.setxattr(src / "opt", "trusted.overlay.opaque", b"y")
    (src / "opt" / "f").write_bytes(b"f")
    r = pull(store, f"dir:{src}", "fromdir")
    tree = store.layer_tree(r.image.top_layer)
    assert lookup(tree, "etc/gone").is_whiteout and lookup(tree, "opt").is_opaque
    assert lookup(tree, "etc/link").target == b"big"
    assert Path(store.find_object(lookup(tree, "etc/big").object_path)).read_bytes() == b"B" * 1000
    layer = store.layer(r.image.top_layer)
    assert layer.diff_id == "sha256:" + hashlib.sha256(dump_bytes(tree)).hexdigest()
    assert pull(store, str(src)).present == (layer.id,)


def test_terminal_progress_writes_one_line(tmp_path):
    import io

    out = io.StringIO()
    p = TerminalProgress(out)
    p(5_000_000, 10)
    p(6_000_000, 11)   # within 0.2 s: not redrawn
    p.done()
    text = out.getvalue()
    assert text.startswith("\r") and "5.0 MB, 10 entries" in text and "11 entries" not in text


# --- kill -9 during an import ------------------------------------------------------------------------

CHILD = r"""
import os, signal, sys
sys.path.insert(0, {root!r})
import objects.store as ostore
from flatmount import pull as pullmod
from flatmount.api import open_store
from flatmount.store import batch as batchmod

store_dir, source, point = sys.argv[1:4]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point.startswith("put"):  # the n-th object put, streamed (put_async, which put uses) or in memory
    n, count = int(point[3:]), [0]
    def counting(orig):
        def put(self, data, *args, **kw):
            count[0] += 1
            if count[0] == n:
                die()
            return orig(self, data, *args, **kw)
        return put
    ostore.ObjectStore.put_async = counting(ostore.ObjectStore.put_async)
    ostore.ObjectStore.put_bytes = counting(ostore.ObjectStore.put_bytes)
elif point == "after-first-layer":
    orig_add = batchmod.ImportBatch.add_layer
    def add_layer(self, *a, **kw):
        orig_add(self, *a, **kw)
        die()
    batchmod.ImportBatch.add_layer = add_layer
elif point == "before-commit":
    def commit(self):
        die()
    batchmod.ImportBatch.commit = commit
elif point == "in-transaction":
    orig_fsync = batchmod.fsync_dir
    def fsync_dir(path):
        orig_fsync(path)
        if os.path.basename(str(path)) == "layers":
            die()
    batchmod.fsync_dir = fsync_dir
s = open_store(store_dir, runroot=store_dir + "-run", config=os.devnull, additional=[])
pullmod.pull(s, source, "crash")
print("finished")
"""


@pytest.fixture(scope="module")
def crash_source(tmp_path_factory):
    d = tmp_path_factory.mktemp("crashsrc")
    layers = []
    for i, kind in enumerate(("gzip", "zstd", "none")):
        t = Tar(root=i == 0)
        for j in range(12):
            t.file(f"l{i}/f{j}", os.urandom(300_000))
        for j in range(300):  # enough for objects.bulk helper processes (so kills hit them too)
            t.file(f"l{i}/small{j}", os.urandom(100 + j))
        layers.append((t.bytes(), kind))
    make_oci(d / "oci", layers, tag="crash")
    return f"oci:{d / 'oci'}:crash"


def _after_crash_then_repull(store_dir: Path, source: str) -> None:
    check_consistent(store_dir)
    s = mkstore(store_dir)
    r = pull(s, source, "crash")
    check_consistent(store_dir)
    assert s.resolve_image("crash").id == r.image.id
    assert os.listdir(store_dir / "tmp") == []
    assert os.listdir(store_dir / "objects" / ".tmp") == []
    layer_rows = {x.id + ext for x in s.layers() for ext in (".erofs", ".tree")}  # image, tree cache
    assert set(os.listdir(store_dir / "layers")) == layer_rows
    from flatmount.image.reader import read_tree

    for rec in s.layer_chain(r.image.top_layer):
        tree = s.layer_tree(rec.id)
        assert len(tree.entries) == 1 and tree == read_tree(rec.image_path)
    s.close()


@pytest.mark.parametrize("point", ["put5", "put30", "after-first-layer", "before-commit", "in-transaction"])
def test_kill_at_hook_point_then_repull(tmp_path, crash_source, point):
    store_dir = tmp_path / "store"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT)))
    p = subprocess.run([sys.executable, str(script), str(store_dir), crash_source, point],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert "finished" not in p.stdout
    rows = json.loads(json.dumps(_rows(store_dir)))
    assert rows.get("images", []) == [] and rows.get("names", []) == []  # nothing half-recorded
    _after_crash_then_repull(store_dir, crash_source)


@pytest.mark.parametrize("delay", [0.0, 0.03, 0.08])
def test_kill_after_delay_then_repull(tmp_path, crash_source, delay):
    """SIGKILL at an arbitrary moment once the import is under way (its staging dir exists)."""
    store_dir = tmp_path / "store"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT)))
    p = subprocess.Popen([sys.executable, str(script), str(store_dir), crash_source, "none"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not (store_dir / "tmp").is_dir() or not any(
            n.startswith("import-") for n in os.listdir(store_dir / "tmp")):
        assert p.poll() is None and time.monotonic() < deadline, "the child never started importing"
        time.sleep(0.002)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL and b"finished" not in out
    _after_crash_then_repull(store_dir, crash_source)


def _rows(store_dir: Path) -> dict:
    db = store_dir / "flatmount.db"
    if not db.exists():
        return {}
    con = sqlite3.connect(db)
    try:
        return {t: con.execute(f"SELECT * FROM {t}").fetchall() for t in ("images", "names", "layers")}
    finally:
        con.close()


# --- additional stores -------------------------------------------------------------------------------

def _listing(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))}


def test_additional_store_is_never_written(tmp_path):
    ais = mkstore(tmp_path / "ais")
    demo = pull(ais, f"oci:{DEMO}:demo").image
    ais.close()
    before = _listing(tmp_path / "ais")
    p = mkstore(tmp_path / "primary", additional=[tmp_path / "ais"])
    assert [i.id for i in p.images()] == [demo.id]
    assert p.resolve_image("demo").store_root == str(tmp_path / "ais")
    a = p.additional[0]
    with pytest.raises(ReadOnlyStoreError):
        with a.transaction():
            pass
    with pytest.raises(ReadOnlyStoreError):
        with a.gc_lock(shared=False):
            pass
    with pytest.raises(ReadOnlyStoreError):
        a.ensure_writable()
    with pytest.raises(ReadOnlyStoreError):
        p.remove_image(demo.id)
    with pytest.raises(PermissionError):  # objects' own ReadOnlyObjectStoreError
        a.objects.put_bytes(b"x" * 100)
    with a.gc_lock(shared=True):
        pass
    # a primary name may point at an additional-store image, and shadows its names
    assert p.tag("demo", "mine").names == ("demo:latest", "mine:latest")
    assert p.remove_image("mine").untagged == ("mine:latest",)
    p.close()
    assert _listing(tmp_path / "ais") == before
    assert not any(n.endswith(("-wal", "-shm")) for n in os.listdir(tmp_path / "ais"))


def test_additional_store_with_a_live_writer(tmp_path):
    writer = mkstore(tmp_path / "ais")
    pull(writer, f"oci:{DEMO}:demo")
    db = writer.connect()   # stays open: -wal and -shm exist
    assert os.path.exists(tmp_path / "ais" / "flatmount.db-wal")
    p = mkstore(tmp_path / "primary", additional=[tmp_path / "ais"])
    assert [i.names for i in p.images()] == [("demo:latest",)]
    writer.tag("demo", "later")
    p.close()
    p = mkstore(tmp_path / "primary", additional=[tmp_path / "ais"])
    assert p.resolve_image("later").names == ("demo:latest", "later:latest")
    p.close()
    db.close()
    writer.close()


def test_additional_store_on_readonly_bind_mount(tmp_path, capsys):
    require_root()
    ais = mkstore(tmp_path / "ais")
    demo = pull(ais, f"oci:{DEMO}:demo").image
    extra = pull(ais, "tar:" + tar_file(tmp_path, "x.tar", {"only/in/ais": b"A" * 500}), "aisonly").image
    ais.close()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "--bind", str(tmp_path / "ais"), str(mnt)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], check=True)
        before = _listing(mnt)
        p = mkstore(tmp_path / "primary", additional=[mnt])
        assert {i.id for i in p.images()} == {demo.id, extra.id}
        assert all(i.store_root == str(mnt) for i in p.images())
        assert len(p.layers()) == 5 and all(r.store_root == str(mnt) for r in p.layers())
        image = p.resolve_image("aisonly")
        chain = p.layer_chain(image.top_layer)
        tree = p.layer_tree(chain[0].id)
        node = lookup(tree, "only/in/ais")
        path = p.find_object(node.object_path)
        assert path == str(mnt / "objects" / node.object_path) and Path(path).read_bytes() == b"A" * 500
        assert p.find_object("00/" + "0" * 62) is None
        demo_chain = p.layer_chain(p.resolve_image("demo").top_layer)
        assert [lookup(p.layer_tree(r.id), "/") is not None for r in demo_chain] == [True] * 4
        # the same image pulled into the primary: nothing read, image recorded in the primary
        r = pull(p, f"oci:{DEMO}:demo", "mine")
        assert r.imported == () and len(r.present) == 4
        assert p.resolve_image("mine").store_root == str(p.root)
        p.close()
        # CLI read operations
        args = ["--root", str(tmp_path / "primary"), "--config", os.devnull, "--additional-store", str(mnt)]
        capsys.readouterr()
        assert main(["images", "--json", *args]) == 0
        assert {i["id"] for i in json.loads(capsys.readouterr().out)} == {demo.id, extra.id}
        assert main(["layers", "--json", *args]) == 0
        assert len(json.loads(capsys.readouterr().out)) == 5
        assert main(["inspect", "aisonly", *args]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["image"]["id"] == extra.id and out["layers"][0]["store_root"] == str(mnt)
        assert main(["rmi", "aisonly", *args]) == 3
        assert "ReadOnlyStoreError" in capsys.readouterr().err
        assert _listing(mnt) == before
    finally:
        if subprocess.run(["umount", str(mnt)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=True)


# --- CLI ---------------------------------------------------------------------------------------------

def test_cli(tmp_path, capsys):
    args = ["--root", str(tmp_path / "s"), "--runroot", str(tmp_path / "run"), "--config", os.devnull]
    assert main(["pull", f"oci:{DEMO}:demo", "--json", *args]) == 0
    pulled = json.loads(capsys.readouterr().out)
    assert pulled["image"]["names"] == ["demo:latest"] and len(pulled["imported"]) == 4
    assert main(["pull", f"oci:{DEMO}:demo", *args]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == pulled["image"]["id"] and "already present" in out.err
    assert main(["images", *args]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["NAME", "IMAGE", "ID"] and table[1].startswith("demo:latest")
    assert main(["layers", *args]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5
    assert main(["tag", "demo", "other", "--json", *args]) == 0
    assert json.loads(capsys.readouterr().out)["names"] == ["demo:latest", "other:latest"]
    assert main(["inspect", pulled["image"]["id"][:8], *args]) == 0
    assert len(json.loads(capsys.readouterr().out)["layers"]) == 4
    assert main(["inspect", pulled["imported"][0][:10], *args]) == 0
    assert json.loads(capsys.readouterr().out)["layer"]["id"] == pulled["imported"][0]
    assert main(["rmi", "other", "demo", *args]) == 0
    assert capsys.readouterr().out.splitlines() == ["Untagged: other:latest", "Untagged: demo:latest",
                                                    "Deleted: " + pulled["image"]["id"]]
    assert main(["images", "--json", *args]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["inspect", "demo", *args]) == 3
    err = capsys.readouterr().err
    assert "NotFoundError" in err and "'demo'" in err
