"""c/storage layers are verified against their claimed diff_id (tar-split rebuild), or recorded as
unverified under an id no digest-checked pull reuses.

The planted case is built for real: podman imports a genuine image into a c/storage store, podman
exports it as an OCI layout (the genuine, digest-verified image), then the store's layer is changed
under its unchanged `diff-digest`.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_root, require_tool
from cstorage_fixtures import cleanup_mounts, podman, write_containers_conf, write_storage_conf

from flatmount.api import open_store
from flatmount.errors import FormatError, LayerError
from flatmount.fsck import fsck
from flatmount.pull import pull
from flatmount.sources import cstorage
from flatmount.sources.tarsplit import TarSplitStream
from flatmount.store.records import chain_id, layer_is_unverified, unverified_chain_id

GENUINE = b"genuine motd: welcome to the real image\n" * 4
PLANTED = b"PLANTED motd: this is not the image's c" * 4 + b"ontent!!"    # also > 64 bytes
IMAGE = "localhost/genuine:latest"
ROOT = Path(__file__).resolve().parent.parent


class CStore:
    """A c/storage store with one image made by `podman import`, and its OCI export."""

    def __init__(self, base: Path):
        require_root()
        require_tool("podman")
        require_tool("tar")
        self.base = base
        self.graphroot = base / "cs"
        self.conf = base / "storage.conf"
        write_storage_conf(self.conf, self.graphroot, base / "cs-run")
        write_containers_conf(base / "containers.conf", base)
        (base / "libpod-tmp").mkdir()
        rootfs = base / "rootfs"
        (rootfs / "etc").mkdir(parents=True)
        (rootfs / "bin").mkdir()
        (rootfs / "etc" / "motd").write_bytes(GENUINE)
        (rootfs / "etc" / "small").write_text("hi\n")
        (rootfs / "bin" / "tool").write_bytes(b"\x7fELF" + bytes(range(256)) * 4)
        os.chmod(rootfs / "bin" / "tool", 0o755)
        tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], capture_output=True, check=True)
        self.env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(self.conf),
                    "CONTAINERS_CONF": str(base / "containers.conf")}
        podman(self.env, "import", "-", IMAGE, stdin=tar.stdout)
        self.oci = base / "oci"
        podman(self.env, "save", "--format", "oci-dir", "-o", str(self.oci), IMAGE)
        cs = cstorage.CStorage([self.graphroot])
        with cs.reading():
            (self.layer,) = cs.layer_chain(cs.resolve_image(IMAGE).top_layer)
        self.diff = Path(self.layer.diff_dir)
        self.tarsplit = self.graphroot / cstorage.tarsplit_path(self.layer)
        assert self.tarsplit.is_file()

    def close(self) -> None:
        subprocess.run(["podman", "image", "umount", "--all"], env=self.env, capture_output=True)
        cleanup_mounts(self.base)


def _store(tmp_path: Path):
    return open_store(tmp_path / "fm", runroot=tmp_path / "fm-run")


def _read_mounted(store, ref: str, path: str) -> bytes:
    with store.mount(ref) as merged:
        with open(os.path.join(merged, path), "rb") as f:
            return f.read()


def _names(store, ref: str, path: str) -> set[str]:
    with store.mount(ref) as merged:
        return set(os.listdir(os.path.join(merged, path)))


@pytest.mark.parametrize("plant", ["same-size", "other-size", "no-tar-split"])
def test_planted_layer_is_not_reused_by_a_verified_pull(cstore, tmp_path, plant):
    genuine_id = chain_id(None, cstore.layer.diff_id)
    os.chmod(cstore.diff / "etc" / "motd", 0o644)
    if plant == "same-size":
        (cstore.diff / "etc" / "motd").write_bytes(PLANTED[:len(GENUINE)].ljust(len(GENUINE), b"!"))
    else:
        (cstore.diff / "etc" / "motd").write_bytes(PLANTED)
    if plant == "no-tar-split":
        cstore.tarsplit.unlink()
    store = _store(tmp_path)
    try:
        rec = cstorage.pull_cstorage(store, f"containers-storage:{IMAGE}", storage_conf=cstore.conf)
        (layer,) = store.layer_chain(rec.top_layer)
        assert layer.id == unverified_chain_id(None, cstore.layer.diff_id) != genuine_id
        assert layer_is_unverified(layer.id, layer.parent, layer.diff_id)
        assert not store.has_layer(genuine_id)
        res = fsck(store)
        assert res.ok and [(p.kind, p.subject) for p in res.problems] == [("unverified-layer", layer.id)]

        # the genuine image, digest-verified: its layer is imported, not taken from the planted one
        got = pull(store, f"oci:{cstore.oci}")
        assert got.image.id == rec.id
        assert got.imported == (genuine_id,) and got.present == ()
        assert store.resolve_image(IMAGE).top_layer == genuine_id
        assert _read_mounted(store, IMAGE, "etc/motd") == GENUINE
        # pulling the c/storage image again does not take the image back to the planted layer
        cstorage.pull_cstorage(store, f"containers-storage:{IMAGE}", storage_conf=cstore.conf)
        assert store.resolve_image(IMAGE).top_layer == genuine_id
        assert _read_mounted(store, IMAGE, "etc/motd") == GENUINE
    finally:
        store.close()


def test_planted_top_layer_over_a_verified_base(cstore, tmp_path):
    """Two layers (podman build: COPY over the imported base), only the top one planted: the base
    verifies and is shared, the top is unverified; the digest-checked pull imports only the top."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "added").write_bytes(GENUINE * 2)
    (ctx / "Containerfile").write_text(f"FROM {IMAGE}\nCOPY added /etc/added\n")
    podman(cstore.env, "build", "--isolation", "chroot", "-t", "localhost/two:latest", str(ctx))
    two_oci = tmp_path / "two-oci"
    podman(cstore.env, "save", "--format", "oci-dir", "-o", str(two_oci), "localhost/two:latest")
    cs = cstorage.CStorage([cstore.graphroot])
    with cs.reading():
        base, top = cs.layer_chain(cs.resolve_image("localhost/two:latest").top_layer)
    (Path(top.diff_dir) / "etc" / "added").write_bytes(PLANTED)
    store = _store(tmp_path)
    try:
        rec = cstorage.pull_cstorage(store, "containers-storage:localhost/two:latest", storage_conf=cstore.conf)
        chain = store.layer_chain(rec.top_layer)
        assert [lay.id for lay in chain] == [base.id, unverified_chain_id(base.id, top.diff_id)]
        assert [(p.kind, p.subject) for p in fsck(store).problems] == [("unverified-layer", chain[1].id)]
        assert _read_mounted(store, "localhost/two:latest", "etc/added") == PLANTED
        got = pull(store, f"oci:{two_oci}")
        assert got.present == (base.id,) and got.imported == (top.id,)
        assert store.resolve_image("localhost/two:latest").top_layer == top.id
        assert _read_mounted(store, "localhost/two:latest", "etc/added") == GENUINE * 2
    finally:
        store.close()


def test_cli_says_unverified(cstore, tmp_path):
    (cstore.diff / "etc" / "motd").write_bytes(PLANTED)
    env = {**cstore.env, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "flatmount", "--root", str(tmp_path / "fm"), "--runroot", str(tmp_path / "run")]
    p = subprocess.run([*base, "pull", f"containers-storage:{IMAGE}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "imported (UNVERIFIED" in p.stderr
    p = subprocess.run([*base, "pull", f"oci:{cstore.oci}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and "imported" in p.stderr and "UNVERIFIED" not in p.stderr, p.stderr
    p = subprocess.run([*base, "fsck"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "unverified-layer" in p.stdout + p.stderr, p.stdout + p.stderr


def test_diff_dir_extras_are_not_imported_under_a_verified_diff_id(cstore, tmp_path):
    """tar-split intact, diff dir tampered beyond file contents (an added file, a setuid bit): the
    layer verifies, and what is recorded is the rebuilt tar stream, not the diff dir."""
    (cstore.diff / "etc" / "evil").write_text("planted\n")
    os.chmod(cstore.diff / "bin" / "tool", 0o4755)
    store = _store(tmp_path)
    try:
        rec = cstorage.pull_cstorage(store, f"containers-storage:{IMAGE}", storage_conf=cstore.conf)
        genuine_id = chain_id(None, cstore.layer.diff_id)
        assert rec.top_layer == genuine_id
        assert _names(store, IMAGE, "etc") == {"motd", "small"}
        with store.mount(IMAGE) as merged:
            assert os.stat(os.path.join(merged, "bin/tool")).st_mode & 0o7777 == 0o755
        assert fsck(store).problems == ()
        got = pull(store, f"oci:{cstore.oci}")        # verified and identical: reused
        assert got.present == (genuine_id,) and got.imported == ()
    finally:
        store.close()


def test_genuine_layer_verifies_and_is_reused(cstore, tmp_path):
    store = _store(tmp_path)
    try:
        rec = cstorage.pull_cstorage(store, f"containers-storage:{IMAGE}", storage_conf=cstore.conf)
        assert rec.top_layer == cstore.layer.id == chain_id(None, cstore.layer.diff_id)
        assert _read_mounted(store, IMAGE, "etc/motd") == GENUINE
        got = pull(store, f"oci:{cstore.oci}")
        assert got.present == (rec.top_layer,) and got.imported == ()
    finally:
        store.close()


def test_symlink_in_diff_dir_is_not_read_for_the_stream(cstore, tmp_path):
    """A file of the stream replaced by a symlink to a same-size host file: never read (the layer
    is then unverified, and the symlink stays a symlink)."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"S" * len(GENUINE))
    (cstore.diff / "etc" / "motd").unlink()
    os.symlink(secret, cstore.diff / "etc" / "motd")
    store = _store(tmp_path)
    try:
        rec = cstorage.pull_cstorage(store, f"containers-storage:{IMAGE}", storage_conf=cstore.conf)
        assert rec.top_layer == unverified_chain_id(None, cstore.layer.diff_id)
        with store.mount(IMAGE) as merged:
            assert os.readlink(os.path.join(merged, "etc/motd")) == str(secret)
    finally:
        store.close()


def test_changed_image_config_is_refused(cstore, tmp_path):
    """The image record is trusted by its id too: a config that does not hash to it is refused (a
    verified pull of the same image id would otherwise keep the planted config)."""
    cs = cstorage.CStorage([cstore.graphroot])
    with cs.reading():
        image = cs.resolve_image(IMAGE)
    path = cstore.graphroot / "overlay-images" / image.id / cstorage.bigdata_filename("sha256:" + image.id)
    config = json.loads(path.read_bytes())
    config.setdefault("config", {})["Entrypoint"] = ["/bin/tool", "--planted"]
    path.write_text(json.dumps(config))
    store = _store(tmp_path)
    try:
        with pytest.raises(FormatError, match="sha256 is not its id"):
            cstorage.pull_cstorage(store, f"containers-storage:{IMAGE}", storage_conf=cstore.conf)
        assert store.images() == []
    finally:
        store.close()


# --- the stream rebuilder on crafted tar-split data -------------------------------------------------

def _tarsplit(*entries: dict) -> io.BufferedReader:
    data = b"".join(json.dumps(e).encode() + b"\n" for e in entries)
    return gzip.GzipFile(fileobj=io.BytesIO(gzip.compress(data)), mode="rb")


@pytest.mark.parametrize("entry,words", [
    ({"type": 1, "name": "../outside/secret", "size": 6}, "outside the layer"),
    ({"type": 1, "name": "a/../../outside/secret", "size": 6}, "outside the layer"),
    ({"type": 1, "name": "link/secret", "size": 6}, "symlink"),
    ({"type": 1, "name": "file", "size": 99}, "not the 99-byte file"),
    ({"type": 1, "name": "missing", "size": 3}, "No such file"),
    ({"type": 1, "name": "fifo", "size": 3}, "not a regular file"),
    ({"type": 1, "name": "null", "size": 3}, "not a regular file"),
    ({"type": 1, "size": 3}, "without a name"),
    ({"type": 2, "payload": "!!"}, "not base64"),
    ({"type": 7}, "unknown entry type"),
])
def test_tarsplit_stream_refuses(tmp_path, entry, words):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("secret")
    diff = tmp_path / "diff"
    (diff / "a").mkdir(parents=True)
    (diff / "file").write_text("abc")
    os.symlink(tmp_path / "outside", diff / "link")
    os.mkfifo(diff / "fifo")                               # opened, it would block the read
    os.mknod(diff / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    fd = os.open(diff, os.O_RDONLY | os.O_DIRECTORY)
    try:
        stream = TarSplitStream(_tarsplit({"type": 2, "payload": "aGVhZGVy"}, entry), fd, "t")
        with pytest.raises(LayerError, match=words):
            while stream.read(4096):
                pass
        stream.close()
    finally:
        os.close(fd)


def test_tarsplit_stream_interleaves(tmp_path):
    diff = tmp_path / "diff"
    (diff / "d").mkdir(parents=True)
    (diff / "d" / "f").write_bytes(b"0123456789" * 300_000)
    fd = os.open(diff, os.O_RDONLY | os.O_DIRECTORY)
    try:
        stream = TarSplitStream(_tarsplit(
            {"type": 2, "payload": "aGVhZA=="}, {"type": 1, "name": "./d/", "payload": None},
            {"type": 1, "name": "./d/f", "size": 3_000_000, "payload": "AAAAAAAAAAA="},
            {"type": 2, "payload": "dGFpbA=="}), fd, "t")
        out = b""
        while chunk := stream.read(1 << 16):
            out += chunk
    finally:
        os.close(fd)
    assert out == b"head" + b"0123456789" * 300_000 + b"tail"
