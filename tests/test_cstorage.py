"""flatmount.sources.cstorage: reading containers/storage overlay stores directly.

Three parts: pure tables (config, references, names, whiteout normalisation); synthetic c/storage
stores written here (JSON, locks, diff dirs in all three whiteout forms); and real stores built by
podman once per session (tests/cstorage_fixtures.py), checked against what podman itself reports.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cstorage_fixtures
import pytest
from conftest import require_root
from cstorage_fixtures import PodmanStores, cleanup_mounts, fingerprint, podman

from flatmount.errors import FormatError, LayerError, NotFoundError, StoreError
from flatmount.image.tree import OPAQUE_XATTR, S_IFCHR, Inode, lookup, walk
from flatmount.sources import cstorage
from flatmount.sources.cstorage import (
    CStorage,
    CStorageRef,
    IDMap,
    StorageConfig,
    bigdata_filename,
    chain_id,
    load_config,
    name_candidates,
    normalise_layer_tree,
    parse_config,
    parse_spec,
    read_layer_tree,
)

podman_stores = cstorage_fixtures.podman_stores   # the session fixture, requested by name below

# ==================================================================================================
# storage.conf and references
# ==================================================================================================


def test_parse_config_full():
    conf = parse_config(textwrap.dedent("""
        [storage]
        driver = "overlay"
        graphroot = "/g"
        runroot = "/r"
        imagestore = "/i"
        [storage.options]
        additionalimagestores = ["/a1", "/a2"]
        [storage.options.overlay]
        mount_program = "/usr/bin/fuse-overlayfs"
    """), "x.conf")
    assert conf == StorageConfig(graphroot="/g", runroot="/r", driver="overlay", imagestore="/i",
                                 additional=("/a1", "/a2"), path="x.conf")
    assert [s.graphroot for s in CStorage.from_config(conf).stores] == ["/i", "/g", "/a1", "/a2"]


def test_parse_config_defaults():
    conf = parse_config("")
    assert (conf.graphroot, conf.runroot, conf.driver, conf.additional) == (
        "/var/lib/containers/storage", "/run/containers/storage", "overlay", ())


@pytest.mark.parametrize("text", [
    "[storage\n",                                                       # not TOML
    '[storage.options]\nadditionalimagestores = "/a"\n',               # not a list
    '[storage.options]\nadditionalimagestores = ["rel/path"]\n',       # not absolute
])
def test_parse_config_rejects(text):
    with pytest.raises(FormatError):
        parse_config(text)


def test_unsupported_driver():
    with pytest.raises(StoreError, match="vfs"):
        CStorage.from_config(StorageConfig(graphroot="/g", driver="vfs"))


def test_load_config_sources(tmp_path, monkeypatch):
    a, b = tmp_path / "a.conf", tmp_path / "b.conf"
    a.write_text('[storage]\ngraphroot = "/from-a"\n')
    b.write_text('[storage]\ngraphroot = "/from-b"\n')
    monkeypatch.setenv("CONTAINERS_STORAGE_CONF", str(b))
    assert load_config(a).graphroot == "/from-a"          # explicit argument first
    assert load_config().graphroot == "/from-b"           # then the environment
    monkeypatch.setenv("CONTAINERS_STORAGE_CONF", str(tmp_path / "missing.conf"))
    with pytest.raises(StoreError, match="missing.conf"):
        load_config()
    with pytest.raises(StoreError):
        load_config(tmp_path / "missing.conf")


@pytest.mark.parametrize("spec, expected", [
    ("containers-storage:localhost/app:latest", CStorageRef("localhost/app:latest")),
    ("containers-storage:app", CStorageRef("app")),
    ("containers-storage:" + "a" * 64, CStorageRef("a" * 64)),
    ("app@sha256:" + "b" * 64, CStorageRef("app@sha256:" + "b" * 64)),
    ("containers-storage:[/var/lib/g]app", CStorageRef("app", graphroot="/var/lib/g")),
    ("containers-storage:[/g+/r]app:1", CStorageRef("app:1", "/g", "/r")),
    ("containers-storage:[overlay@/g+/r]app", CStorageRef("app", "/g", "/r", "overlay")),
    ("containers-storage:[overlay@/g+/r:overlay.mountopt=nodev]app", CStorageRef("app", "/g", "/r", "overlay")),
    ("containers-storage:[overlay@/g]app", CStorageRef("app", "/g", None, "overlay")),
])
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("spec", [
    "containers-storage:", "containers-storage:[/g]", "containers-storage:[/g app",
    "containers-storage:[relative]app", "containers-storage:[/g+rel]app",
])
def test_parse_spec_rejects(spec):
    with pytest.raises(StoreError):
        parse_spec(spec)


@pytest.mark.parametrize("key, name", [
    ("manifest", "manifest"),
    ("abc.0123", "abc.0123"),
    ("", ""),
    # everything else is "=" + standard base64 of the key (values as c/storage writes them)
    ("sha256:abc", "=c2hhMjU2OmFiYw=="),
    ("Manifest", "=TWFuaWZlc3Q="),
    ("manifest-sha256:0", "=bWFuaWZlc3Qtc2hhMjU2OjA="),
    ("signature-ab", "=c2lnbmF0dXJlLWFi"),
])
def test_bigdata_filename(key, name):
    assert bigdata_filename(key) == name


@pytest.mark.parametrize("ref, expected", [
    ("app", ["localhost/app:latest"]),
    ("app:1.0", ["localhost/app:1.0"]),
    ("library/app", ["localhost/library/app:latest"]),
    ("quay.io/a/b", ["quay.io/a/b:latest"]),
    ("localhost:5000/a:t", ["localhost:5000/a:t"]),
    ("docker.io/busybox", ["docker.io/library/busybox:latest"]),
    ("docker.io/x/busybox:1", ["docker.io/x/busybox:1"]),
    ("app@sha256:" + "c" * 64, ["localhost/app@sha256:" + "c" * 64]),
])
def test_name_candidates(ref, expected):
    assert name_candidates(ref) == expected


def test_chain_id_matches_containers_storage():
    # ids seen in a podman-built store: base layer id = its diff_id hex, child = sha256(parent+"+"+hex)
    base = "650b7c5316d3e907dceff67d17602f7475e670725a2c68017663caaa59db2673"
    child_diff = "sha256:eec7bedd0e3ab15f4894728cc73423efbb9a032cc910d55216881d7e0bbdc0e6"
    assert chain_id(None, "sha256:" + base) == base
    assert chain_id(base, child_diff) == "69a1a0aa030d11390ec2a78e48c94d9a42999fa3a69a0f4749eec303a28fa24b"


# ==================================================================================================
# synthetic c/storage stores
# ==================================================================================================

def _diff(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def make_layers(*names: str, parent: str | None = None) -> list[dict]:
    """layers.json entries for a chain of layers named `names` (diff ids derived from the names)."""
    out = []
    for n in names:
        lid = chain_id(parent, _diff(n))
        e = {"id": lid, "created": "2024-01-01T00:00:00Z", "diff-digest": _diff(n),
             "compressed-diff-digest": _diff(n), "diff-size": 10, "compressed-size": 10}
        if parent:
            e["parent"] = parent
        out.append(e)
        parent = lid
    return out


def make_cstore(root: Path, layers: list[dict], images: list[dict],
                big: dict[tuple[str, str], bytes] | None = None) -> Path:
    for sub in ("overlay-layers", "overlay-images", "overlay"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "overlay-layers" / "layers.json").write_text(json.dumps(layers))
    (root / "overlay-layers" / "layers.lock").touch()
    (root / "overlay-images" / "images.json").write_text(json.dumps(images))
    (root / "overlay-images" / "images.lock").touch()
    for e in layers:
        (root / "overlay" / e["id"] / "diff").mkdir(parents=True, exist_ok=True)
    for (iid, key), data in (big or {}).items():
        (root / "overlay-images" / iid).mkdir(exist_ok=True)
        (root / "overlay-images" / iid / bigdata_filename(key)).write_bytes(data)
    return root


def _image(iid: str, top: str | None, *names: str, digest: str | None = None) -> dict:
    e: dict = {"id": iid, "layer": top, "created": "2024-01-01T00:00:00Z",
               "big-data-names": ["sha256:" + iid, "manifest"]}
    if names:
        e["names"] = list(names)
    if digest:
        e["digest"] = digest
    return e


IMG_BASE = "1" * 64
IMG_APP = "ab" + "2" * 62
IMG_OTHER = "ac" + "3" * 62
IMG_HUB = "4" * 64


@pytest.fixture
def two_stores(tmp_path):
    """AIS with base (2 layers) and a docker.io image; primary with app = base + 1 layer."""
    base = make_layers("b0", "b1")
    top = make_layers("a0", parent=base[-1]["id"])
    hub = make_layers("h0")
    cfg = {"rootfs": {"type": "layers", "diff_ids": [_diff("b0"), _diff("b1"), _diff("a0")]}}
    ais = make_cstore(tmp_path / "ais", base + hub, [
        _image(IMG_BASE, base[-1]["id"], "localhost/base:latest"),
        _image(IMG_HUB, hub[-1]["id"], "docker.io/library/busybox:latest", "quay.io/x/tool:1"),
    ])
    main = make_cstore(tmp_path / "main", top, [
        _image(IMG_APP, top[-1]["id"], "localhost/app:latest", "localhost/app:v1",
               digest="sha256:" + "d" * 64),
        _image(IMG_OTHER, top[-1]["id"]),
    ], big={(IMG_APP, "sha256:" + IMG_APP): json.dumps(cfg).encode(),
            (IMG_APP, "manifest"): b'{"config": {"digest": "sha256:' + IMG_APP.encode() + b'"}}'})
    return CStorage([main, ais]), base, top, hub


def test_layers_and_images_json(two_stores):
    cs, base, top, _ = two_stores
    main, ais = cs.stores
    assert set(main.layers()) == {top[0]["id"]}
    lay = main.layers()[top[0]["id"]]
    assert (lay.parent, lay.diff_id, lay.diff_size, lay.graphroot) == (
        base[-1]["id"], _diff("a0"), 10, main.graphroot)
    assert lay.diff_dir == os.path.join(main.graphroot, "overlay", lay.id, "diff")
    imgs = {i.id: i for i in main.images()}
    assert imgs[IMG_APP].names == ("localhost/app:latest", "localhost/app:v1")
    assert imgs[IMG_APP].top_layer == top[0]["id"]
    assert imgs[IMG_OTHER].names == ()
    assert json.loads(cs.image_config(imgs[IMG_APP]))["rootfs"]["diff_ids"][-1] == _diff("a0")
    assert cs.image_config(cs.resolve_image("base")) is None    # no big data for it


def test_chain_across_ais(two_stores):
    cs, base, top, _ = two_stores
    chain = cs.layer_chain(top[0]["id"])
    assert [c.id for c in chain] == [e["id"] for e in base + top]
    assert [c.graphroot for c in chain] == [cs.stores[1].graphroot] * 2 + [cs.stores[0].graphroot]
    assert cstorage.layer_ids(chain) == [c.id for c in chain]
    assert cs.layer_chain(None) == []


def test_primary_shadows_ais(tmp_path):
    layers = make_layers("x")
    main = make_cstore(tmp_path / "main", layers, [])
    ais = make_cstore(tmp_path / "ais", layers, [])
    assert CStorage([main, ais]).layer(layers[0]["id"]).graphroot == str(main)
    assert CStorage([ais, main]).layer(layers[0]["id"]).graphroot == str(ais)


def test_missing_parent_and_loop(tmp_path):
    orphan = make_layers("y", parent="f" * 64)
    cs = CStorage([make_cstore(tmp_path / "s", orphan, [])])
    with pytest.raises(NotFoundError, match="parent of"):
        cs.layer_chain(orphan[0]["id"])
    with pytest.raises(NotFoundError):
        cs.layer("e" * 64)
    a, b = "a" * 64, "b" * 64
    loop = [{"id": a, "parent": b, "diff-digest": _diff("a")}, {"id": b, "parent": a, "diff-digest": _diff("b")}]
    cs = CStorage([make_cstore(tmp_path / "loop", loop, [])])
    with pytest.raises(FormatError, match="loops"):
        cs.layer_chain(a)


@pytest.mark.parametrize("ref, image_id", [
    ("app", IMG_APP), ("app:latest", IMG_APP), ("app:v1", IMG_APP), ("localhost/app", IMG_APP),
    ("localhost/app:v1", IMG_APP), (IMG_APP, IMG_APP), ("sha256:" + IMG_APP, IMG_APP),
    ("ab2", IMG_APP), ("ac", IMG_OTHER), ("base", IMG_BASE), ("1111", IMG_BASE),
    ("busybox", IMG_HUB), ("docker.io/busybox", IMG_HUB), ("docker.io/library/busybox:latest", IMG_HUB),
    ("tool:1", IMG_HUB), ("x/tool:1", IMG_HUB), ("quay.io/x/tool:1", IMG_HUB),
    ("app@sha256:" + "d" * 64, IMG_APP),
])
def test_resolve_image(two_stores, ref, image_id):
    assert two_stores[0].resolve_image(ref).id == image_id


@pytest.mark.parametrize("ref, words", [
    ("a", "ambiguous"), ("app:v2", "not found"), ("tool", "not found"), ("quay.io/x/app", "not found"),
    ("zzz", "not found"), ("base@sha256:" + "d" * 64, "not found"),
])
def test_resolve_image_fails(two_stores, ref, words):
    with pytest.raises(NotFoundError, match=words):
        two_stores[0].resolve_image(ref)


def test_names_primary_first(tmp_path):
    la = make_layers("p")
    lb = make_layers("q")
    main = make_cstore(tmp_path / "main", la, [_image("5" * 64, la[0]["id"], "localhost/same:latest")])
    ais = make_cstore(tmp_path / "ais", lb, [_image("6" * 64, lb[0]["id"], "localhost/same:latest")])
    assert CStorage([main, ais]).resolve_image("same").id == "5" * 64
    assert CStorage([ais, main]).resolve_image("same").id == "6" * 64


def test_bad_json(tmp_path):
    s = make_cstore(tmp_path / "s", [], [])
    (s / "overlay-layers" / "layers.json").write_text("{not json")
    with pytest.raises(FormatError, match="layers.json"):
        CStorage([s]).layer("a" * 64)
    (s / "overlay-layers" / "layers.json").write_text('[{"id": "../../etc"}]')
    with pytest.raises(FormatError, match="bad layer id"):
        CStorage([s]).layer("a" * 64)


def test_empty_store_and_no_lock_files_created(tmp_path):
    (tmp_path / "empty").mkdir()
    cs = CStorage([tmp_path / "empty"])
    with cs.reading():
        assert cs.images() == []
    assert list((tmp_path / "empty").iterdir()) == []


# --- locks ------------------------------------------------------------------------------------------

_LOCKER = textwrap.dedent("""
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    mode = sys.argv[2]
    if mode == "try":
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            sys.exit(1)
        sys.exit(0)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.readline()              # hold the lock until the test says so (or closes stdin)
    fcntl.lockf(fd, fcntl.LOCK_UN)
    print("released", flush=True)
""")


def _wait_for_blocked_lock(*paths: Path, timeout: float = 60.0) -> None:
    """Return once /proc/locks shows a request blocked on one of `paths` (a `->` waiter line).

    An event the kernel reports, not a guess at how long a blocked call takes: on a busy machine a
    waiter may take seconds to reach the lock, and this waits exactly until it has.
    """
    ids = set()
    for path in paths:
        st = os.stat(path)
        ids.add(f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}")
    deadline = time.monotonic() + timeout
    while True:
        with open("/proc/locks") as f:
            if any("->" in line and ids & set(line.split()) for line in f):
                return
        assert time.monotonic() < deadline, f"no request blocked on {paths} within {timeout} s"
        time.sleep(0.01)


def _can_lock_exclusively(path: Path) -> bool:
    return subprocess.run([sys.executable, "-c", _LOCKER, str(path), "try"]).returncode == 0


def test_reader_waits_for_writer(two_stores):
    """A reader blocks while a c/storage writer holds layers.lock and goes on once it is released."""
    import threading

    cs = two_stores[0]
    lock = Path(cs.stores[0].layers_lock)
    p = subprocess.Popen([sys.executable, "-c", _LOCKER, str(lock), "hold"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    read_done = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            cs.stores[0].reload()
            cs.stores[0].layers()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        read_done.set()

    t = threading.Thread(target=reader)
    try:
        assert p.stdout.readline().strip() == "locked"
        t.start()
        _wait_for_blocked_lock(lock)
        assert not read_done.is_set()          # blocked in the kernel on the writer's lock
        p.stdin.write("release\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "released"
        assert read_done.wait(timeout=60) and not errors, errors
    finally:
        p.stdin.close()
        p.wait(timeout=60)
        if t.is_alive():
            t.join(timeout=60)


def test_read_locks_held_while_reading(two_stores):
    cs = two_stores[0]
    locks = [Path(p) for s in cs.stores for p in (s.layers_lock, s.images_lock)]
    before = [p.stat() for p in locks]
    with cs.reading():
        # nested users of the same lock files (big data, reloads) must not drop the process's lock
        img = cs.resolve_image("app")
        assert cs.image_config(img) is not None
        with cs.reading():
            cs.layer_chain(img.top_layer)
        assert not any(_can_lock_exclusively(p) for p in locks)
    assert all(_can_lock_exclusively(p) for p in locks)
    assert cstorage._LOCKS.held() == 0
    assert [(p.st_mtime_ns, p.st_size) for p in before] == [
        (p.stat().st_mtime_ns, p.stat().st_size) for p in locks]


# ==================================================================================================
# whiteout / xattr normalisation
# ==================================================================================================

def D(entries=None, mode=0o755, **kw):  # noqa: N802 - table shorthand
    node = Inode.directory(mode, **kw)
    node.entries = dict(entries or {})
    return node


def F(data=b"", **kw):  # noqa: N802
    return Inode.file(data, **kw)


def WH(**kw):  # noqa: N802
    return Inode.whiteout(**kw)


OPQ = {OPAQUE_XATTR: b"y"}

NORMALISE_CASES = {
    "kernel whiteout stays": (
        D({b"x": WH(uid=3, mtime_ns=5)}), D({b"x": WH(uid=3, mtime_ns=5)})),
    "real device stays": (
        D({b"null": Inode(S_IFCHR | 0o666, rdev=os.makedev(1, 3))}),
        D({b"null": Inode(S_IFCHR | 0o666, rdev=os.makedev(1, 3))})),
    "trusted opaque stays": (
        D({b"d": D(xattrs=dict(OPQ))}), D({b"d": D(xattrs=dict(OPQ))})),
    "user opaque becomes trusted": (
        D({b"d": D(xattrs={b"user.overlay.opaque": b"y"})}), D({b"d": D(xattrs=dict(OPQ))})),
    "opaque x is not opaque": (
        D({b"d": D(xattrs={OPAQUE_XATTR: b"x", b"user.overlay.opaque": b"x"})}), D({b"d": D()})),
    "aufs whiteout": (
        D({b".wh.gone": F(mode=0, uid=7, gid=8, mtime_ns=9)}), D({b"gone": WH(uid=7, gid=8, mtime_ns=9)})),
    "aufs opaque": (
        D({b"d": D({b".wh..wh..opq": F(), b"k": F(b"k")})}), D({b"d": D({b"k": F(b"k")}, xattrs=dict(OPQ))})),
    "aufs meta dropped": (
        D({b".wh..wh.plnk": F(), b".wh..wh.aufs": F()}), D()),
    "aufs whiteout loses to a real entry": (
        D({b".wh.x": F(), b"x": F(b"new")}), D({b"x": F(b"new")})),
    "aufs whiteout in a nested dir": (
        D({b"a": D({b"b": D({b".wh.c": F(mtime_ns=1)})})}), D({b"a": D({b"b": D({b"c": WH(mtime_ns=1)})})})),
    "xattr whiteout": (
        D({b"w": F(xattrs={b"trusted.overlay.whiteout": b""})}), D({b"w": WH()})),
    "overlay bookkeeping dropped": (
        D({b"f": F(b"1", xattrs={b"trusted.overlay.origin": b"o", b"trusted.overlay.impure": b"y",
                                 b"trusted.overlay.nlink": b"U+1", b"trusted.overlay.upper": b"u",
                                 b"trusted.overlay.uuid": b"i", b"trusted.overlay.protattr": b"a",
                                 b"user.overlay.origin": b"o", b"user.overlay.impure": b"y",
                                 b"security.selinux": b"system_u:object_r:container_file_t:s0"})},
          xattrs={b"trusted.overlay.dirmeta_delegate": b"y"}),
        D({b"f": F(b"1")})),
    "content xattrs kept": (
        D({b"f": F(xattrs={b"user.a": b"1", b"security.capability": b"\x01", b"trusted.other": b"t",
                           b"trusted.overlayx": b"not overlay"})}),
        D({b"f": F(xattrs={b"user.a": b"1", b"security.capability": b"\x01", b"trusted.other": b"t",
                           b"trusted.overlayx": b"not overlay"})})),
    "escaped overlay xattr unescaped": (
        D({b"f": F(xattrs={b"trusted.overlay.overlay.redirect": b"/x"})}),
        D({b"f": F(xattrs={b"trusted.overlay.redirect": b"/x"})})),
    "force_mask override_stat applied": (
        D({b"f": F(b"s", mode=0o600, xattrs={b"user.containers.override_stat": b"1000:1001:04755"})}),
        D({b"f": F(b"s", mode=0o4755, uid=1000, gid=1001)})),
    "root attributes kept": (
        D(mode=0o555, uid=1, gid=2, mtime_ns=123), D(mode=0o555, uid=1, gid=2, mtime_ns=123)),
}


@pytest.mark.parametrize("case", list(NORMALISE_CASES))
def test_normalise_table(case):
    given, expected = NORMALISE_CASES[case]
    assert normalise_layer_tree(given) == expected


def test_normalise_hardlinks_once():
    shared = F(b"h" * 100, uid=100000, xattrs={b"trusted.overlay.origin": b"o"})
    root = normalise_layer_tree(D({b"a": shared, b"b": shared, b"d": D({b"c": shared}, uid=100000)}, uid=100000),
                                uidmap=[IDMap(0, 100000, 65536)], gidmap=[IDMap(0, 0, 1)])
    assert root.entries[b"a"] is root.entries[b"b"] is root.entries[b"d"].entries[b"c"]
    assert (shared.uid, shared.xattrs, root.uid) == (0, {}, 0)


@pytest.mark.parametrize("given, words", [
    (D({b"f": F(xattrs={b"trusted.overlay.redirect": b"/x"})}), "redirect"),
    (D({b"f": F(xattrs={b"trusted.overlay.metacopy": b""})}), "metacopy"),
    (D({b"f": F(xattrs={b"user.overlay.redirect": b"/x"})}), "redirect"),
    (D({b".wh.": F()}), "invalid whiteout"),
    (D({b".wh.d": D()}), "directory named like"),
    (D({b"f": F(xattrs={b"trusted.overlay.overlay.opaque": b"y"})}), "cannot be represented"),
    (D({b"f": F(xattrs={b"user.containers.override_stat": b"0:0:040755"})}), "file type"),
    (D({b"f": F(xattrs={b"user.containers.override_stat": b"zero"})}), "bad"),
    (D({b"f": F(uid=5)}), "outside"),
])
def test_normalise_errors(given, words):
    with pytest.raises(LayerError, match=words):
        normalise_layer_tree(given, uidmap=[IDMap(0, 0, 1)])


# --- the three on-disk whiteout forms ---------------------------------------------------------------

MTIME = 1_700_000_000_123_456_789


def _write_diff(diff: Path, form: str) -> None:
    """One logical layer: /gone deleted, /d replaced (opaque), /sub/old deleted, /null a real device,
    /f a file with a user xattr, /big a large file, in kernel / rootless / AUFS whiteout form."""
    (diff / "d").mkdir(parents=True)
    (diff / "d" / "keep").write_text("kept\n")
    (diff / "sub").mkdir()
    (diff / "f").write_text("f\n")
    os.setxattr(diff / "f", "user.note", b"v")
    (diff / "big").write_bytes(b"z" * 1000)
    os.mknod(diff / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chmod(diff / "null", 0o666)
    if form in ("kernel", "rootless"):
        for p in (diff / "gone", diff / "sub" / "old"):
            os.mknod(p, stat.S_IFCHR | 0, os.makedev(0, 0))
        key = "trusted.overlay.opaque" if form == "kernel" else "user.overlay.opaque"
        os.setxattr(diff / "d", key, b"y")
        if form == "rootless":
            os.setxattr(diff / "f", "user.overlay.origin", b"\x00fh")
            os.setxattr(diff / "sub", "user.overlay.impure", b"y")
        else:
            os.setxattr(diff / "sub", "trusted.overlay.impure", b"y")
    else:
        for p in (diff / ".wh.gone", diff / "sub" / ".wh.old", diff / "d" / ".wh..wh..opq"):
            p.touch()
            os.chmod(p, 0)
    os.chmod(diff, 0o555)
    for p in sorted(diff.rglob("*"), reverse=True) + [diff]:
        os.utime(p, ns=(MTIME, MTIME), follow_symlinks=False)


def _expected_layer() -> Inode:
    from objects.digest import fsverity_digest

    t = {"mtime_ns": MTIME}
    return D({
        b"d": D({b"keep": F(b"kept\n", **t)}, xattrs=dict(OPQ), **t),
        b"sub": D({b"old": WH(**t)}, **t),
        b"f": F(b"f\n", xattrs={b"user.note": b"v"}, **t),
        b"big": Inode(stat.S_IFREG | 0o644, size=1000, digest=fsverity_digest(b"z" * 1000), **t),
        b"null": Inode(S_IFCHR | 0o666, rdev=os.makedev(1, 3), **t),
        b"gone": WH(**t),
    }, mode=0o555, **t)


@pytest.mark.parametrize("form", ["kernel", "rootless", "aufs"])
def test_diff_dir_forms(tmp_path, form):
    require_root()   # trusted.* xattrs and mknod
    from objects import ObjectStore

    layers = make_layers("l")
    store = make_cstore(tmp_path / "cs", layers, [])
    diff = store / "overlay" / layers[0]["id"] / "diff"
    diff.rmdir()
    _write_diff(diff, form)
    objects = ObjectStore(tmp_path / "objects")
    tree = read_layer_tree(CStorage([store]).layer(layers[0]["id"]), objects)
    assert tree == _expected_layer()
    assert objects.has(lookup(tree, "big").digest)


def test_layer_dir_problems(tmp_path):
    layers = make_layers("l1", "l2", "l3")
    layers[0]["flags"] = {"incomplete": True}
    store = make_cstore(tmp_path / "cs", layers, [])
    (store / "overlay" / layers[1]["id"] / "diff").rmdir()
    (store / "overlay" / layers[2]["id"] / "composefs-data").mkdir()
    (store / "overlay" / layers[2]["id"] / "composefs-data" / "composefs.blob").touch()
    cs = CStorage([store])
    for lay, words in zip(layers, ["incomplete", "missing", "composefs"], strict=True):
        with pytest.raises(LayerError, match=words):
            read_layer_tree(cs.layer(lay["id"]))


def test_layer_without_diff_id(tmp_path):
    layers = make_layers("l1")
    del layers[0]["diff-digest"]
    cs = CStorage([make_cstore(tmp_path / "cs", layers, [])])
    with pytest.raises(LayerError, match="diff-digest"):
        cstorage.layer_ids(cs.layer_chain(layers[0]["id"]))


# ==================================================================================================
# real stores built by podman
# ==================================================================================================

def _cs(stores: PodmanStores, spec: str = "containers-storage:x") -> CStorage:
    return CStorage.open(parse_spec(spec), stores.main_conf)


def test_podman_chains_match(podman_stores):
    cs = _cs(podman_stores)
    for name, info in podman_stores.images.items():
        img = cs.resolve_image(name)
        assert img.id == info.id
        chain = cs.layer_chain(img.top_layer)
        assert [c.diff_id for c in chain] == info.diff_ids
        assert [c.diff_dir for c in chain] == info.diff_dirs      # which store holds each layer
        assert cstorage.layer_ids(chain) == [c.id for c in chain]
        cfg = json.loads(cs.image_config(img))
        assert cfg["rootfs"]["diff_ids"] == info.diff_ids
    app = cs.layer_chain(cs.resolve_image("app").top_layer)
    assert app[0].graphroot == str(podman_stores.ais)             # base layer only in the AIS
    assert all(c.graphroot == str(podman_stores.main) for c in app[1:])
    assert not (podman_stores.main / "overlay" / app[0].id).exists()
    ais2 = cs.layer_chain(cs.resolve_image("ais2").top_layer)
    assert [c.graphroot for c in ais2] == [str(podman_stores.ais)] * 2
    assert cs.resolve_image("step1").top_layer == app[1].id


def test_podman_bigdata_names(podman_stores):
    cs = _cs(podman_stores)
    for img in cs.images():
        files = set(os.listdir(os.path.join(img.graphroot, "overlay-images", img.id)))
        assert {bigdata_filename(k) for k in img.big_data_names} <= files
        for f in files - {"manifest"}:
            key = base64.b64decode(f[1:]).decode()
            assert f.startswith("=") and key in img.big_data_names


def test_podman_spec_forms(podman_stores):
    s = podman_stores
    ids = {"app": s.images["localhost/app:latest"].id, "base": s.images["localhost/base:latest"].id}
    for spec, conf, want in [
        (f"containers-storage:[{s.ais}]localhost/base:latest", None, "base"),
        (f"containers-storage:[overlay@{s.main}+{s.base / 'main-run'}]app", s.main_conf, "app"),
        (f"containers-storage:{ids['app'][:12]}", s.main_conf, "app"),
        (f"containers-storage:sha256:{ids['base']}", s.main_conf, "base"),
    ]:
        ref = parse_spec(spec)
        assert CStorage.open(ref, conf).resolve_image(ref.ref).id == ids[want]
    # without the AIS configured the primary alone does not know the base layer
    ref = parse_spec(f"containers-storage:[{s.main}]app")
    with pytest.raises(NotFoundError):
        cs = CStorage.open(ref, s.base / "storage-ais.conf")   # this conf has no AIS
        cs.layer_chain(cs.resolve_image("app").top_layer)


def test_podman_layer_trees(podman_stores):
    cs = _cs(podman_stores)
    chain = cs.layer_chain(cs.resolve_image("app").top_layer)
    trees = [read_layer_tree(c) for c in chain]
    for t in trees:
        assert stat.S_IMODE(t.mode) == 0o555                     # the diff/ root as c/storage made it
    l1, l2, l3 = trees[1:]
    assert lookup(l1, "etc/small").is_whiteout and lookup(l1, "opt/link").is_whiteout
    assert stat.S_IMODE(lookup(l1, "usr/share/doc").mode) == 0o700
    assert lookup(l1, "etc/bigadded").size == 500 and lookup(l1, "etc/bigadded").digest is not None
    assert lookup(l2, "opt/app").is_opaque and set(lookup(l2, "opt/app").entries) == {b"new", b"empty"}
    assert not lookup(l2, "opt").is_opaque
    assert lookup(l3, "etc/big.txt") is lookup(l3, "etc/big.hard")
    assert (lookup(l3, "etc/big.txt").uid, lookup(l3, "etc/big.txt").gid) == (1000, 1000)
    null = lookup(l3, "etc/null")
    assert null.ftype == S_IFCHR and null.rdev == os.makedev(1, 3) and not null.is_whiteout
    assert lookup(l3, "usr/share/doc").is_whiteout and lookup(l3, "usr/share/doc2/readme").content == b"doc\n"
    assert lookup(l3, "opt/app/new").mode & stat.S_ISUID
    base = trees[0]
    assert lookup(base, "opt/app/b") is lookup(base, "opt/app/b.hard")
    assert lookup(base, "opt/link").target == b"../etc/small"
    for _, node in walk(l1):
        assert not any(k.startswith(b"trusted.overlay.") and k != OPAQUE_XATTR for k in node.xattrs)


def test_podman_flatten_equals_kernel_merge(podman_stores):
    """Independent check: flattening our layer trees gives what podman's own overlay mount shows."""
    from flatmount.flatten import flatten_trees
    from flatmount.sources.directory import scan_directory

    cs = _cs(podman_stores)
    chain = cs.layer_chain(cs.resolve_image("app").top_layer)
    flat = flatten_trees([read_layer_tree(c) for c in chain])
    env = podman_stores.env()
    merged = podman(env, "image", "mount", "localhost/app:latest").strip()
    try:
        kernel = scan_directory(merged)
    finally:
        podman(env, "image", "umount", "localhost/app:latest")
        cleanup_mounts(podman_stores.base)
    assert flat == kernel


# --- pull into a flatmount store ---------------------------------------------------------------------

def _open_store(root: Path, additional=None):
    from flatmount.api import open_store

    return open_store(root / "store", additional=additional, runroot=root / "run")


def _exported_layer_tree(s: PodmanStores, c, tmp: Path) -> Inode:
    """The layer as podman exports it (`podman save`), with the root rule of c/storage layers (the
    diff dir's mode without write bits, owner and mtime): what a verified c/storage import records."""
    from flatmount.sources.layers import read_tar
    from objects import ObjectStore

    blob = cstorage_fixtures.exported_layers(s)[c.diff_id]
    with open(blob, "rb") as f:
        layer = read_tar(f, ObjectStore(tmp / "ref-objects"))
    assert layer.diff_id == c.diff_id
    st = os.lstat(c.diff_dir)
    tree = layer.tree
    tree.mode, tree.uid, tree.gid, tree.mtime_ns = (stat.S_IFDIR | (st.st_mode & 0o755), st.st_uid,
                                                    st.st_gid, st.st_mtime_ns)
    return tree


def _check_pulled(store, cs: CStorage, info, rec, s: PodmanStores, tmp: Path) -> None:
    """Every layer verified (same ids as c/storage's) and recorded as podman exports it; the flattened
    view equals the one from the diff dirs (the merged-view tests compare it with podman's)."""
    from flatmount.flatten import flatten_trees
    from flatmount.sources.directory import scan_directory

    assert rec.id == info.id
    chain = store.layer_chain(rec.top_layer)
    assert [lay.diff_id for lay in chain] == info.diff_ids
    cchain = cs.layer_chain(cs.resolve_image(info.id).top_layer)
    assert [lay.id for lay in chain] == [c.id for c in cchain]
    for lay, c in zip(chain, cchain, strict=True):
        assert store.layer_tree(lay.id) == _exported_layer_tree(s, c, tmp), lay.id
        assert lay.parent == c.parent
    scanned = [normalise_layer_tree(scan_directory(c.diff_dir), uidmap=c.uidmap, gidmap=c.gidmap)
               for c in cchain]
    assert flatten_trees([store.layer_tree(lay.id) for lay in chain]) == flatten_trees(scanned)
    assert rec.config == json.loads(cs.image_config(cs.resolve_image(info.id)))


def test_pull_cstorage(podman_stores, tmp_path):
    s = podman_stores
    cstorage_fixtures.exported_layers(s)    # (podman save writes to the store: before the fingerprints)
    before = {p: fingerprint(p) for p in (s.ais, s.main)}
    store = _open_store(tmp_path)
    cs = _cs(s)
    t0 = time.monotonic()
    rec = cstorage.pull_cstorage(store, "containers-storage:app", storage_conf=s.main_conf)
    elapsed = time.monotonic() - t0
    _check_pulled(store, cs, s.images["localhost/app:latest"], rec, s, tmp_path)
    assert "localhost/app:latest" in rec.names
    assert store.resolve_image("localhost/app:latest").id == rec.id
    # the intermediate image shares its layers: nothing new is read, the name is recorded
    rec2 = cstorage.pull_cstorage(store, "containers-storage:step1", "copy/step1:v1", storage_conf=s.main_conf)
    _check_pulled(store, cs, s.images["localhost/step1:latest"], rec2, s, tmp_path)
    assert {"localhost/step1:latest", "copy/step1:v1"} <= set(rec2.names)
    # an image whose every layer (top included) lives only in the AIS
    rec3 = cstorage.pull_cstorage(store, "containers-storage:ais2", storage_conf=s.main_conf)
    _check_pulled(store, cs, s.images["localhost/ais2:latest"], rec3, s, tmp_path)
    assert {p: fingerprint(p) for p in (s.ais, s.main)} == before   # no c/storage store was touched
    assert cstorage._LOCKS.held() == 0
    assert elapsed < 30


def test_pull_skips_layers_in_additional_flatmount_store(podman_stores, tmp_path):
    s = podman_stores
    lower = _open_store(tmp_path / "lower")
    base = cstorage.pull_cstorage(lower, "containers-storage:base", storage_conf=s.main_conf)
    upper = _open_store(tmp_path / "upper", additional=[str(tmp_path / "lower" / "store")])
    rec = cstorage.pull_cstorage(upper, "containers-storage:app", storage_conf=s.main_conf)
    chain = upper.layer_chain(rec.top_layer)
    assert chain[0].id == base.top_layer
    assert os.path.realpath(chain[0].store_root) == os.path.realpath(tmp_path / "lower" / "store")
    assert all(os.path.realpath(c.store_root) == os.path.realpath(tmp_path / "upper" / "store")
               for c in chain[1:])


def test_pull_from_read_only_ais(podman_stores, tmp_path):
    """The AIS bind-mounted read-only: everything still works and nothing in it changes."""
    s = podman_stores
    ro = tmp_path / "ro-ais"
    ro.mkdir()
    conf = tmp_path / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{s.main}"\n'
                    f'[storage.options]\nadditionalimagestores = ["{ro}"]\n')
    cstorage_fixtures.exported_layers(s)
    before = fingerprint(s.ais)
    subprocess.run(["mount", "--bind", str(s.ais), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        with pytest.raises(OSError):
            (ro / "probe").touch()
        store = _open_store(tmp_path)
        cs = CStorage.open(None, conf)
        assert cs.layer_chain(cs.resolve_image("app").top_layer)[0].graphroot == str(ro)
        rec = cstorage.pull_cstorage(store, "containers-storage:localhost/app:latest", storage_conf=conf)
        _check_pulled(store, cs, s.images["localhost/app:latest"], rec, s, tmp_path)
        rec = cstorage.pull_cstorage(store, "containers-storage:ais2", storage_conf=conf)
        _check_pulled(store, cs, s.images["localhost/ais2:latest"], rec, s, tmp_path)
    finally:
        subprocess.run(["umount", str(ro)], check=False)
        cleanup_mounts(tmp_path)
    assert fingerprint(s.ais) == before


def test_pull_unknown_image(podman_stores, tmp_path):
    store = _open_store(tmp_path)
    with pytest.raises(NotFoundError):
        cstorage.pull_cstorage(store, "containers-storage:nope", storage_conf=podman_stores.main_conf)


def test_pull_dispatch(podman_stores, tmp_path, monkeypatch):
    """`flatmount.pull.pull("containers-storage:...")` reaches pull_cstorage; storage.conf from env."""
    from flatmount.pull import pull

    monkeypatch.setenv("CONTAINERS_STORAGE_CONF", str(podman_stores.main_conf))
    store = _open_store(tmp_path)
    info = podman_stores.images["localhost/step1:latest"]
    first = pull(store, "containers-storage:step1")
    assert first.image.id == info.id and len(first.imported) == 2 and first.present == ()
    again = pull(store, "containers-storage:localhost/app:latest", "app-copy")
    assert again.present == first.imported and len(again.imported) == 2
    assert store.resolve_image("app-copy").id == podman_stores.images["localhost/app:latest"].id


def test_podman_writer_waits_for_our_read_locks(podman_stores):
    """A real c/storage writer (podman tag rewrites images.json) blocks while we read."""
    env = podman_stores.env()
    cs = _cs(podman_stores)
    with cs.reading():
        p = subprocess.Popen(["podman", "tag", "localhost/app:latest", "localhost/locktest:1"], env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_for_blocked_lock(*(Path(q) for s in cs.stores for q in (s.layers_lock, s.images_lock)))
            assert p.poll() is None, p.stderr.read()
        except BaseException:
            p.kill()
            p.wait()
            raise
    assert p.wait(timeout=60) == 0
    try:
        cs.reload()
        assert cs.resolve_image("locktest:1").id == podman_stores.images["localhost/app:latest"].id
    finally:
        podman(env, "untag", "localhost/app:latest", "localhost/locktest:1")


def test_cli_pull_shows_progress_on_a_terminal(podman_stores, tmp_path):
    """`flatmount pull containers-storage:...` at a terminal says which layer it reads; -q does not."""
    from ptyrun import run_on_tty

    env = {"CONTAINERS_STORAGE_CONF": str(podman_stores.main_conf)}
    opts = ["--root", str(tmp_path / "store"), "--runroot", str(tmp_path / "run")]
    rc, out, tty = run_on_tty([*opts, "pull", "containers-storage:step1"], env)
    assert rc == 0 and out.strip() == podman_stores.images["localhost/step1:latest"].id, tty
    assert "containers-storage: reading layer" in tty and "\x1b[K" in tty
    rc, out, tty = run_on_tty(["-q", "--root", str(tmp_path / "q"), "--runroot", str(tmp_path / "run"),
                               "pull", "containers-storage:step1"], env)
    assert rc == 0 and tty == "", tty
