"""flatmount.sources.oci + pull: OCI layouts (tar, gzip, zstd layers) imported, read back, and refused when bad."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

from flatmount.api import open_store
from flatmount.errors import DigestMismatchError, LayerError, NotFoundError
from flatmount.image.tree import lookup, walk
from flatmount.pull import pull
from flatmount.store import reftable
from tests.tarbuild import Tar, bad_tars, check_consistent, make_oci, store_state

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "flatmount" / "examples" / "demo-oci"


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "store", runroot=tmp_path / "run", config=os.devnull, additional=[])
    yield s
    s.close()


def three_layers() -> list[Tar]:
    a = Tar(root_mtime=10)
    a.dir("etc/", mtime=11)
    a.file("etc/os-release", b"NAME=test\n" * 20, mtime=12)
    a.file("etc/hostname", b"box\n")
    a.dir("usr/bin/", mode=0o755)
    a.file("usr/bin/tool", os.urandom(9000), mode=0o755, xattrs={"user.x": "1"})
    a.hardlink("usr/bin/tool2", "usr/bin/tool")
    a.symlink("usr/bin/t", "tool")
    a.device("usr/null", "c", 1, 3)
    a.fifo("usr/fifo")
    a.dir("opt/app/", mtime=13)
    a.file("opt/app/old", b"old" * 40)
    b = Tar(root=False)
    b.file("etc/os-release", b"NAME=test2\n" * 20, mtime=20)
    b.whiteout("etc/.wh.hostname")
    b.file("opt/app/new", b"new" * 40, pax={"mtime": "20.5"})
    b.whiteout("opt/app/.wh..wh..opq")
    c = Tar(root=False)
    c.file("srv/" + "x" * 150, b"long name")
    c.whiteout("usr/bin/.wh.t")
    return [a, b, c]


@pytest.mark.parametrize("kinds", [("gzip", "zstd", "none"), ("none", "gzip", "gzip"), ("zstd", "zstd", "zstd")])
def test_pull_reads_back_exactly(store, tmp_path, kinds):
    tars = three_layers()
    blobs = [t.bytes() for t in tars]
    info = make_oci(tmp_path / "oci", list(zip(blobs, kinds, strict=True)), tag="v1")
    result = pull(store, f"oci:{tmp_path / 'oci'}:v1")
    image = result.image
    assert image.id == info["config"].split(":")[1]
    assert image.names == ("v1:latest",)
    assert len(result.imported) == 3 and result.present == ()
    chain = store.layer_chain(image.top_layer)
    assert [r.diff_id for r in chain] == info["diff_ids"]
    assert [r.compressed_digest for r in chain] == [d["digest"] for d in info["layers"]]
    assert [r.diff_size for r in chain] == [len(b) for b in blobs]
    for rec, t in zip(chain, tars, strict=True):
        tree = store.layer_tree(rec.id)
        assert tree == t.tree()
        for digest, data in t.blobs.items():
            path = store.find_object(digest.hex()[:2] + "/" + digest.hex()[2:])
            assert path is not None and Path(path).read_bytes() == data
    base = store.layer_tree(chain[0].id)
    assert lookup(base, "usr/bin/tool") is lookup(base, "usr/bin/tool2")  # hardlink survives the image
    assert lookup(store.layer_tree(chain[1].id), "opt/app").is_opaque
    assert image.config["rootfs"]["diff_ids"] == info["diff_ids"]
    check_consistent(store.root)
    assert os.listdir(store.root / "tmp") == []


def test_demo_example(store, tmp_path):
    result = pull(store, f"oci:{DEMO}:demo")
    image = store.resolve_image("demo")
    assert image == result.image and image.names == ("demo:latest",)
    chain = store.layer_chain(image.top_layer)
    assert len(chain) == 4
    trees = [store.layer_tree(r.id) for r in chain]
    assert lookup(trees[0], "usr/bin/hello") is lookup(trees[0], "usr/bin/hi")
    assert lookup(trees[0], "usr/bin/hello").xattrs == {b"user.flatmount.demo": b"hello"}
    assert lookup(trees[0], "opt/app/app.py").digest is not None
    assert lookup(trees[2], "etc/motd").is_whiteout and lookup(trees[2], "usr/bin/greet").is_whiteout
    assert lookup(trees[2], "opt/app").is_opaque
    assert sorted(lookup(trees[2], "opt/app").entries) == [b"VERSION", b"main.py"]
    refs = len(reftable.rows(store.connect()))
    assert refs == sum(len({n.object_path for _, n in walk(t) if n.is_reg and n.is_external}) for t in trees)
    # the committed example is what tools/make_example.py writes (tar bytes pinned by the config digest)
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import make_example
    finally:
        sys.path.remove(str(ROOT / "tools"))
    info = make_example.build(tmp_path / "regen")
    assert info["config"] == "sha256:" + image.id
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total < 1 << 20


def test_shared_layers_are_not_read_again(store, tmp_path):
    tars = three_layers()
    blobs = [t.bytes() for t in tars]
    make_oci(tmp_path / "one", [(blobs[0], "gzip"), (blobs[1], "gzip")], tag="one")
    first = pull(store, f"oci:{tmp_path / 'one'}:one")
    info = make_oci(tmp_path / "two", [(blobs[0], "gzip"), (blobs[1], "gzip"), (blobs[2], "zstd")], tag="two")
    # the two shared blobs are gone from the second layout: they must not even be opened
    for d in info["layers"][:2]:
        os.unlink(tmp_path / "two" / "blobs" / "sha256" / d["digest"].split(":")[1])
    second = pull(store, f"oci:{tmp_path / 'two'}:two")
    assert second.present == first.imported and len(second.imported) == 1
    assert store.layer(second.image.top_layer).parent == first.image.top_layer
    again = pull(store, f"oci:{tmp_path / 'two'}:two", name="other")
    assert again.imported == () and again.image.names == ("other:latest", "two:latest")


def test_tag_selection(store, tmp_path):
    t = Tar()
    t.file("a", b"a")
    make_oci(tmp_path / "single", [(t.bytes(), "none")], tag="only")
    assert pull(store, f"oci:{tmp_path / 'single'}").image.names == ("only:latest",)
    assert pull(store, str(tmp_path / "single"), name="bare").image.names == ("bare:latest", "only:latest")
    make_oci(tmp_path / "multi", [(t.bytes(), "none")], tag="main", extra_manifests=2)
    with pytest.raises(LayerError, match="holds 3 manifests: give a tag.*extra0, extra1, main"):
        pull(store, f"oci:{tmp_path / 'multi'}")
    with pytest.raises(NotFoundError, match="'nope' is not in"):
        pull(store, f"oci:{tmp_path / 'multi'}:nope")
    assert "extra1:latest" in pull(store, f"oci:{tmp_path / 'multi'}:extra1").image.names


def test_nested_index_picks_this_platform(store, tmp_path):
    from flatmount.store.batch import host_architecture

    t = Tar()
    t.file("a", b"a")
    info = make_oci(tmp_path / "oci", [(t.bytes(), "gzip")], tag=None)
    mdigest = info["manifest"]
    blobs = tmp_path / "oci" / "blobs" / "sha256"
    msize = (blobs / mdigest.split(":")[1]).stat().st_size
    other = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "0" * 64,
             "size": 10, "platform": {"os": "linux", "architecture": "mips"}}
    mine = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest, "size": msize,
            "platform": {"os": "linux", "architecture": host_architecture()}}
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [other, mine]}).encode()
    ih = hashlib.sha256(index).hexdigest()
    (blobs / ih).write_bytes(index)
    (tmp_path / "oci" / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": "sha256:" + ih, "size": len(index),
         "annotations": {"org.opencontainers.image.ref.name": "multi"}}]}))
    image = pull(store, f"oci:{tmp_path / 'oci'}:multi").image
    assert image.id == info["config"].split(":")[1] and image.names == ("multi:latest",)


# --- bad layouts: the error, and the store exactly as before ---------------------------------------

def _good_tars():
    a = Tar()
    a.file("etc/a", b"a" * 500)
    b = Tar(root=False)
    b.file("etc/b", b"b" * 700)
    return a.bytes(), b.bytes()


def _rewrite_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _bad_layouts():
    def unknown_media(d):
        a, b = _good_tars()
        make_oci(d, [(a, "gzip"), (b, "gzip")], media_types={1: "application/vnd.example.layer.v1.squashfs"})

    def missing_blob(d):
        a, b = _good_tars()
        info = make_oci(d, [(a, "gzip"), (b, "zstd")])
        os.unlink(Path(d) / "blobs" / "sha256" / info["layers"][1]["digest"].split(":")[1])

    def blob_digest_mismatch(d):
        a, b = _good_tars()
        tampered = Tar(root=False)
        tampered.file("etc/b", b"B" * 700)
        make_oci(d, [(a, "gzip"), (b, "none")], blob_override={1: tampered.bytes()})  # same size

    def size_mismatch(d):
        a, b = _good_tars()
        make_oci(d, [(a, "none"), (b, "none")], sizes={1: 7})

    def diff_id_mismatch(d):
        a, b = _good_tars()
        make_oci(d, [(a, "zstd"), (b, "zstd")], diff_ids={1: "sha256:" + "1" * 64})

    def diff_id_count(d):
        a, b = _good_tars()
        info = make_oci(d, [(a, "gzip"), (b, "gzip")])
        # a manifest listing one layer more than the config has diff_ids
        mpath = Path(d) / "blobs" / "sha256" / info["manifest"].split(":")[1]
        doc = json.loads(mpath.read_text())
        doc["layers"].append(doc["layers"][0])
        data = json.dumps(doc).encode()
        h = hashlib.sha256(data).hexdigest()
        (Path(d) / "blobs" / "sha256" / h).write_bytes(data)
        _rewrite_json(Path(d) / "index.json", lambda ix: ix["manifests"][0].update(digest="sha256:" + h, size=len(data)))

    def traversal_digest(d):
        a, b = _good_tars()
        info = make_oci(d, [(a, "gzip"), (b, "gzip")])
        mpath = Path(d) / "blobs" / "sha256" / info["manifest"].split(":")[1]
        doc = json.loads(mpath.read_text())
        doc["layers"][1]["digest"] = "sha256:../../../../etc/passwd"
        data = json.dumps(doc).encode()
        h = hashlib.sha256(data).hexdigest()
        (Path(d) / "blobs" / "sha256" / h).write_bytes(data)
        _rewrite_json(Path(d) / "index.json", lambda ix: ix["manifests"][0].update(digest="sha256:" + h, size=len(data)))

    def manifest_tampered(d):
        a, b = _good_tars()
        info = make_oci(d, [(a, "gzip"), (b, "gzip")])
        mpath = Path(d) / "blobs" / "sha256" / info["manifest"].split(":")[1]
        mpath.write_bytes(mpath.read_bytes().replace(b'"schemaVersion": 2', b'"schemaVersion": 3'))

    def corrupt_index(d):
        a, b = _good_tars()
        make_oci(d, [(a, "gzip")])
        (Path(d) / "index.json").write_text("{not json")

    def no_layout_marker(d):
        a, b = _good_tars()
        make_oci(d, [(a, "gzip")])
        os.unlink(Path(d) / "oci-layout")

    def bad_tar_in_second_layer(d):
        a, _ = _good_tars()
        bad = next(c for c in bad_tars() if c[0] == "dotdot")[1]
        make_oci(d, [(a, "gzip"), (bad, "zstd")])

    def truncated_gzip_layer(d):
        a, b = _good_tars()
        from tests.tarbuild import compress

        gz = compress(b, "gzip")
        make_oci(d, [(a, "gzip"), (b, "gzip")], blob_override={1: gz[: len(gz) // 2]})

    return [
        ("unknown-media-type", unknown_media, LayerError, "unknown media type"),
        ("missing-blob", missing_blob, LayerError, "is missing"),
        ("blob-digest-mismatch", blob_digest_mismatch, DigestMismatchError, "blob digest"),
        ("size-mismatch", size_mismatch, DigestMismatchError, "descriptor says 7 bytes"),
        ("diff-id-mismatch", diff_id_mismatch, DigestMismatchError, "diff_id"),
        ("diff-id-count", diff_id_count, LayerError, "3 layers but the config 2"),
        ("traversal-digest", traversal_digest, LayerError, "malformed digest"),
        ("manifest-tampered", manifest_tampered, DigestMismatchError, "does not match"),
        ("corrupt-index", corrupt_index, LayerError, "invalid JSON"),
        ("no-oci-layout", no_layout_marker, LayerError, "no oci-layout"),
        ("bad-tar-in-second-layer", bad_tar_in_second_layer, LayerError, r"'\.\.'"),
        ("truncated-gzip-layer", truncated_gzip_layer, LayerError, "truncated|ends inside"),
    ]


@pytest.mark.parametrize("case", _bad_layouts(), ids=lambda c: c[0])
def test_bad_layout_leaves_store_unchanged(store, tmp_path, case):
    _name, build, exc, message = case
    pull(store, f"oci:{DEMO}:demo")            # a store with content, so "unchanged" means something
    before = store_state(store.root)
    build(tmp_path / "bad")
    with pytest.raises(exc, match=message):
        pull(store, f"oci:{tmp_path / 'bad'}:t")
    assert store_state(store.root) == before
    check_consistent(store.root)
