"""Issue 13 items 12 and 14-18: bad input gets one clear line and exit 3, never a traceback; out-of-range
fields name their entry; truncated zstd is refused; diff quotes names; whiteout content is not stored;
`diff` resolves names to images first."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT, require_tool
from tarbuild import Tar, compress, make_oci

from flatmount.cli import main
from flatmount.errors import FormatError
from flatmount.image.tree import S_IFREG, Inode


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """main() in this process: (exit code, stdout, stderr); a traceback would fail the test itself."""
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_error(rc: int, err: str, *words: str) -> str:
    """Exit 3 and exactly one line on stderr, a flatmount error (not the catch-all) with these words."""
    lines = err.splitlines()
    assert rc == 3, err
    assert len(lines) == 1, err
    assert "internal error" not in err and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture
def st(tmp_path) -> list[str]:
    return ["--root", str(tmp_path / "root"), "--runroot", str(tmp_path / "run")]


def _write(tmp_path: Path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def _rechecksum(block: bytearray) -> None:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block[:512])


def _gnu_tar_with(name: str, type_: bytes = tarfile.REGTYPE, patch: tuple[int, bytes] | None = None) -> bytes:
    """A one-entry GNU tar whose header fields in `patch` are overwritten (e.g. base-256 numbers)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        ti = tarfile.TarInfo(name)
        ti.type = type_
        tf.addfile(ti)
    data = bytearray(buf.getvalue())
    if patch is not None:
        off, value = patch
        data[off:off + len(value)] = value
    _rechecksum(data)
    return bytes(data)


# --- 12: tracebacks seen -------------------------------------------------------------------------

@pytest.mark.parametrize("mtime", ["nan", "inf", "-inf", "1e400", "9" * 5000])
def test_pax_mtime_that_is_not_a_number(tmp_path, capsys, st, mtime):
    ti = tarfile.TarInfo("etc/f")
    ti.pax_headers = {"mtime": mtime}
    t = Tar()
    t.raw(ti, b"")
    rc, _, err = cli(capsys, *st, "pull", "tar:" + _write(tmp_path, "l.tar", t.bytes()))
    one_error(rc, err, "LayerError", "'etc/f'", "mtime")


def test_base256_device_numbers_beyond_int_range(tmp_path, capsys, st):
    huge = b"\xff" + b"\x7f" * 7         # base-256, negative and far beyond a C int
    big = b"\x80" + b"\x00" * 3 + b"\x7f" + b"\x00" * 3   # base-256, 2**39
    for i, patch in enumerate(((329, huge), (337, big))):
        tar = _gnu_tar_with("dev/x", tarfile.CHRTYPE, patch)
        rc, _, err = cli(capsys, *st, "pull", "tar:" + _write(tmp_path, f"d{i}.tar", tar))
        one_error(rc, err, "LayerError", "'dev/x'", "device number")


def test_base256_uid_beyond_32_bits_names_the_entry(tmp_path, capsys, st):
    tar = _gnu_tar_with("home/u", patch=(108, b"\x80\x00\x00\x01\x00\x00\x00\x00"))
    rc, _, err = cli(capsys, *st, "pull", "tar:" + _write(tmp_path, "u.tar", tar))
    one_error(rc, err, "LayerError", "'home/u'", "uid 4294967296")


def _layer() -> bytes:
    t = Tar()
    t.file("a", b"x")
    return t.bytes()


def _put_blob(layout: Path, data: bytes) -> dict:
    h = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / h).write_bytes(data)
    return {"digest": "sha256:" + h, "size": len(data)}


def _relink(layout: Path, info: dict, *, config: bytes | None = None, manifest: bytes | None = None) -> None:
    """Point index.json (tag t) at a new manifest (and config)."""
    if manifest is None:
        cdesc = {"mediaType": "application/vnd.oci.image.config.v1+json", **_put_blob(layout, config)}
        manifest = json.dumps({"schemaVersion": 2, "config": cdesc, "layers": info["layers"]}).encode()
    mdesc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", **_put_blob(layout, manifest),
             "annotations": {"org.opencontainers.image.ref.name": "t"}}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [mdesc]}))


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("where", ["index.json", "oci-layout", "manifest", "config"])
def test_deeply_nested_json_in_an_oci_layout(tmp_path, capsys, st, where):
    layout = tmp_path / "oci"
    info = make_oci(layout, [(_layer(), "none")], tag="t")
    if where == "index.json":
        (layout / "index.json").write_text('{"schemaVersion": 2, "manifests": ' + DEEP + "}")
    elif where == "oci-layout":
        (layout / "oci-layout").write_text('{"imageLayoutVersion": ' + "[" * 2000 + "]" * 2000 + "}")
    elif where == "manifest":
        _relink(layout, info, manifest=('{"schemaVersion": 2, "layers": ' + DEEP + "}").encode())
    else:
        _relink(layout, info, config=('{"rootfs": {"diff_ids": ' + DEEP + "}}").encode())
    rc, _, err = cli(capsys, *st, "pull", f"oci:{layout}:t")
    one_error(rc, err, "LayerError", "nested too deeply")


def test_config_nested_too_deep_for_later_readers_is_refused(tmp_path, capsys, st):
    """900 levels still parse, but `inspect`/`images --json` of the stored config could not print it."""
    layout = tmp_path / "oci"
    info = make_oci(layout, [(_layer(), "none")], tag="t")
    config = json.loads((layout / "blobs" / "sha256" / info["config"][7:]).read_bytes())
    config["x"] = json.loads("[" * 900 + "]" * 900)
    _relink(layout, info, config=json.dumps(config).encode())
    rc, _, err = cli(capsys, *st, "pull", f"oci:{layout}:t")
    one_error(rc, err, "LayerError", "nested too deeply")
    config["x"] = json.loads("[" * 90 + "]" * 90)
    _relink(layout, info, config=json.dumps(config).encode())
    assert cli(capsys, *st, "pull", f"oci:{layout}:t")[0] == 0
    for cmd in (["inspect", "t"], ["images", "--json"]):
        rc, out, err = cli(capsys, *st, *cmd)
        assert rc == 0 and out, err


def test_ref_name_that_is_a_number(tmp_path, capsys, st):
    layout = tmp_path / "oci"
    make_oci(layout, [(_layer(), "none")], tag=None)
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0]["annotations"] = {"org.opencontainers.image.ref.name": 5}
    (layout / "index.json").write_text(json.dumps(index))
    for spec in (f"oci:{layout}", f"oci:{layout}:5"):
        rc, _, err = cli(capsys, *st, "pull", spec)
        one_error(rc, err, "LayerError", "org.opencontainers.image.ref.name", "not a string")


@pytest.mark.parametrize("value", ["[" * 100_000 + "]" * 100_000, "{a=" * 5000 + "1" + "}" * 5000])
def test_deeply_nested_storage_conf(tmp_path, capsys, value):
    conf = _write(tmp_path, "storage.conf", f"[storage]\nx = {value}\n".encode())
    rc, _, err = cli(capsys, "--config", conf, "images")
    one_error(rc, err, "StoreError", conf, "nested too deeply")


@pytest.mark.parametrize("key", ["root", "runroot"])
def test_storage_conf_path_with_a_nul_byte(tmp_path, capsys, key):
    conf = _write(tmp_path, "storage.conf", f'[storage]\n{key} = "/tmp/a\\u0000b"\n'.encode())
    rc, _, err = cli(capsys, "--config", conf, "images")
    one_error(rc, err, "StoreError", f"{key} must be an absolute path")


def test_diff_output_into_a_missing_directory(tmp_path, capsys, st):
    assert cli(capsys, *st, "pull", "tar:" + _write(tmp_path, "a.tar", _layer()), "--name", "a")[0] == 0
    out = tmp_path / "missing" / "dir" / "o.tar"
    rc, _, err = cli(capsys, *st, "diff", "a", "a", "-o", str(out))
    one_error(rc, err, str(out), "does not exist")
    assert not (tmp_path / "missing").exists()


def test_runroot_that_is_a_file(tmp_path, capsys):
    runroot = _write(tmp_path, "runroot", b"")
    for cmd in (["mounts"], ["cleanup"], ["images"]):
        rc, _, err = cli(capsys, "--root", str(tmp_path / "root"), "--runroot", runroot, *cmd)
        one_error(rc, err, "StoreError", runroot, "not a directory")


def _unprivileged(*argv: str) -> subprocess.CompletedProcess:
    setpriv = require_tool("setpriv")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("FLATMOUNT_DEBUG", None)
    return subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                           "-m", "flatmount", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_a_user_who_cannot_read_the_store(tmp_path, capsys):
    """A root-owned store (0700) used by nobody: every command says so in one line, exit 3."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    top = tempfile.mkdtemp(prefix="flatmount-perm-", dir="/tmp")   # (tmp_path's parents are 0700)
    try:
        os.chmod(top, 0o755)
        st = ["--root", f"{top}/root", "--runroot", f"{top}/run"]
        assert cli(capsys, *st, "pull", "tar:" + _write(tmp_path, "a.tar", _layer()), "--name", "a")[0] == 0
        assert stat.S_IMODE(os.stat(f"{top}/root").st_mode) == 0o700
        layer = _write(Path(top), "l.tar", _layer())
        os.chmod(layer, 0o644)
        for cmd in (["images"], ["layers"], ["inspect", "a"], ["tag", "a", "b"], ["rmi", "a"], ["flatten", "a"],
                    ["mounts"], ["gc", "--dry-run"], ["gc"], ["fsck"], ["cleanup"], ["umount", "/nowhere"],
                    ["objects", "usage"], ["objects", "top"], ["pull", f"tar:{layer}"]):
            r = _unprivileged(*st, *cmd)
            lines = r.stderr.splitlines()
            assert r.returncode == 3 and len(lines) == 1, (cmd, r.stderr)
            assert "Traceback" not in r.stderr and "internal error" not in r.stderr, (cmd, r.stderr)
            assert "StoreError" in lines[0] and "Permission denied" in lines[0], (cmd, lines[0])
            assert f"{top}/root" in lines[0], (cmd, lines[0])
    finally:
        shutil.rmtree(top)


# --- 12: the catch-all ---------------------------------------------------------------------------

@pytest.mark.parametrize("exc, words", [
    (PermissionError(13, "Permission denied", "/some/where"), ["flatmount: images: Permission denied: /some/where"]),
    (NotADirectoryError(20, "Not a directory", "/a", None, "/b"), ["flatmount: images: Not a directory: /a -> /b"]),
    (OSError(5, "Input/output error"), ["flatmount: images: Input/output error"]),
    (RecursionError("maximum recursion depth exceeded"), ["internal error in images", "nested too deeply"]),
    (MemoryError(), ["internal error in images", "out of memory"]),
    (KeyError("x\ny"), ["internal error in images", "KeyError"]),
])
def test_cli_turns_every_exception_into_one_line(capsys, monkeypatch, tmp_path, exc, words):
    import flatmount.cli.store as image

    def boom(args):
        raise exc

    monkeypatch.setattr(image, "cmd_images", boom)
    monkeypatch.delenv("FLATMOUNT_DEBUG", raising=False)
    rc, _, err = cli(capsys, "--root", str(tmp_path), "images")
    assert rc == 3 and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)
    monkeypatch.setenv("FLATMOUNT_DEBUG", "1")
    rc, _, err = cli(capsys, "--root", str(tmp_path), "images")
    assert rc == 3
    if not isinstance(exc, OSError):   # the traceback only on request
        assert "Traceback" in err


def test_cli_subprocess_no_traceback_for_internal_errors(tmp_path):
    """The same through a real process: a RecursionError deep inside still leaves one line."""
    code = ("import sys, flatmount.cli.store as m\n"
            "def f(a): return f(a)\n"
            "m.cmd_images = f\n"
            "from flatmount.cli import main\n"
            f"sys.exit(main(['--root', {str(tmp_path)!r}, 'images']))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("FLATMOUNT_DEBUG", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 3 and len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


# --- 14: out-of-range fields name the entry ------------------------------------------------------

@pytest.mark.parametrize("field, kw", [
    ("uid", {"uid": 1 << 33}), ("gid", {"gid": -1}), ("mtime", {"mtime_ns": 10 ** 30}),
    ("too large", {"size": 1 << 65, "digest": b"\x01" * 32}),
])
def test_writer_names_path_and_field(field, kw):
    from flatmount.image.writer import image_bytes

    root = Inode.directory()
    d = root.entries[b"etc"] = Inode.directory()
    d.entries[b"ok"] = Inode.file(b"fine")
    sub = d.entries[b"sub dir\n"] = Inode.directory()
    sub.entries[b"bad"] = Inode(S_IFREG | 0o644, **kw)
    with pytest.raises(FormatError) as e:
        image_bytes(root)
    msg = str(e.value)
    assert '"/etc/sub dir\\n/bad"' in msg and field in msg and "\n" not in msg, msg


def test_out_of_range_field_through_mkimage(tmp_path, capsys):
    dump = tmp_path / "x.dump"
    dump.write_bytes(b"/ 4096 40755 2 0 0 0 0.0 - - -\n/f 0 100644 1 0 0 0 99999999999999999999.0 - - -\n")
    rc, _, err = cli(capsys, "mkimage", "--from-dump", str(dump), str(tmp_path / "o.erofs"))
    one_error(rc, err, "/f", "mtime")


# --- 15: truncated zstd --------------------------------------------------------------------------

def _big_tar() -> bytes:
    t = Tar()
    t.file("a", bytes(range(256)) * 4000)
    t.file("b", os.urandom(300_000))
    t.file("c", b"c" * 10)
    return t.bytes()


@pytest.mark.parametrize("checksum", [False, True])
@pytest.mark.parametrize("cut", ["unfinished", "unfinished-second", "last-byte", "last-block", "half",
                                 "second-frame"])
def test_truncated_zstd_is_refused_like_gzip(tmp_path, capsys, st, checksum, cut):
    import zstandard

    tar = _big_tar()
    z = zstandard.ZstdCompressor(level=3, write_checksum=checksum)
    one = z.compress(tar)
    two = z.compress(tar[:100_000]) + z.compress(tar[100_000:])        # a multi-frame stream
    def unfinished(data: bytes) -> bytes:
        """All of `data` in complete blocks, but the frame never ended (no last block, no checksum):
        what a writer that died before closing leaves; the tar inside is whole."""
        c = z.compressobj()
        return c.compress(data) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)

    blob = {"unfinished": unfinished(tar), "unfinished-second": z.compress(tar[:100_000]) + unfinished(tar[100_000:]),
            "last-byte": one[:-1], "last-block": one[:-(4 if checksum else 0) - 3000],
            "half": one[:len(one) // 2], "second-frame": two[:-1000]}[cut]
    rc, _, err = cli(capsys, *st, "pull", "tar:" + _write(tmp_path, "l.tar.zst", blob))
    one_error(rc, err, "LayerError", "truncated")
    gz = compress(tar, "gzip")
    rc, _, err = cli(capsys, *st, "pull", "tar:" + _write(tmp_path, "l.tar.gz",
                                                      gz[:min(len(gz) - 1, len(gz) * len(blob) // len(one))]))
    one_error(rc, err, "LayerError", "truncated")
    for whole in (one, two, one + (0x184D2A55).to_bytes(4, "little") + b"\x03\0\0\0abc"):  # + skippable frame
        rc, _, err = cli(capsys, *st, "pull", "tar:" + _write(tmp_path, "ok.tar.zst", whole))
        assert rc == 0, err


# --- 16: diff quotes names -----------------------------------------------------------------------

def test_diff_text_quotes_names_json_stays_exact(tmp_path, capsys, st):
    base = Tar()
    base.file("etc/passwd", b"root:x:0:0\n")
    top = Tar()
    top.file("etc/passwd", b"root:x:0:0\n")
    names = ["etc/x\nD /etc/passwd", "etc/bad-\udcff", "etc/tab\tq\"b\\", "etc/caf\u00e9"]
    for n in names:
        top.file(n, b"new")
    for name, t in (("base", base), ("top", top)):
        assert cli(capsys, *st, "pull", "tar:" + _write(tmp_path, f"{name}.tar", t.bytes()), "--name", name)[0] == 0
    rc = main([*st, "diff", "base", "top"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.splitlines() == [
        "C /etc",
        'A "/etc/bad-\\377"',
        "A /etc/caf\u00e9",
        'A "/etc/tab\\tq\\"b\\\\"',
        'A "/etc/x\\nD "',                    # (the tar's name holds slashes: directories)
        'A "/etc/x\\nD /etc"',
        'A "/etc/x\\nD /etc/passwd"',           # one line, no forged "D /etc/passwd"
    ], out
    rc = main([*st, "diff", "base", "top", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert sorted(c["path"] for c in doc["changes"]) == sorted(
        ["/etc", "/etc/x\nD ", "/etc/x\nD /etc"] + ["/" + n for n in names])


def test_quote_path_rules():
    from flatmount.quoting import quote_path

    assert quote_path(b"/usr/bin/ls") == b"/usr/bin/ls"
    assert quote_path(b"/caf\xc3\xa9 x") == b"/caf\xc3\xa9 x"
    assert quote_path(b"/a\nb") == b'"/a\\nb"'
    assert quote_path(b"/\x01\x7f\xff") == b'"/\\001\\177\\377"'
    assert quote_path(b"/\xc2\x9b2J") == b'"/\\302\\2332J"'     # C1 control (CSI) in UTF-8
    assert quote_path(b'/"q"') == b'"/\\"q\\""'


# --- 17: whiteout content ------------------------------------------------------------------------

def _objects(root: Path) -> list[str]:
    objs = root / "objects"
    return sorted(f"{d.name}/{f.name}" for d in objs.iterdir() if len(d.name) == 2 and d.is_dir()
                  for f in d.iterdir())


def test_whiteout_content_is_not_stored(tmp_path, capsys, st):
    t = Tar()
    t.file("keep", b"k" * 100)
    for name, size in (("a/.wh.inline", 10), ("a/.wh.small", 100_000), ("b/.wh.big", 3 << 20),
                       ("c/.wh..wh..opq", 5000)):
        ti = tarfile.TarInfo(name)
        t.raw(ti, os.urandom(size))
    rc, _, err = cli(capsys, *st, "pull", "tar:" + _write(tmp_path, "l.tar", t.bytes()), "--name", "w")
    assert rc == 0, err
    from objects.digest import fsverity_digest

    assert _objects(tmp_path / "root") == [fsverity_digest(b"k" * 100).hex()[:2] + "/" +
                                           fsverity_digest(b"k" * 100).hex()[2:]]
    from flatmount.api import open_store

    with open_store(tmp_path / "root", runroot=tmp_path / "run") as s:
        from flatmount.store.integrity import read_layer_tree

        tree = read_layer_tree(s.layer(s.resolve_image("w").top_layer))
    assert tree.entries[b"a"].entries[b"inline"].is_whiteout
    assert tree.entries[b"b"].entries[b"big"].is_whiteout
    assert tree.entries[b"c"].is_opaque
    assert cli(capsys, *st, "fsck")[0] == 0


# --- 18: diff names: images first ----------------------------------------------------------------

def test_diff_prefers_the_image_over_a_file_of_that_name(tmp_path, capsys, st, monkeypatch):
    a, b = Tar(), Tar()
    a.file("f", b"a")
    b.file("f", b"b")
    b.file("g", b"g")
    for name, t in (("a", a), ("b", b)):
        assert cli(capsys, *st, "pull", "tar:" + _write(tmp_path, f"{name}.tar", t.bytes()), "--name", name)[0] == 0
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "a").write_bytes(b"not an image")                  # a file named like image a
    shutil.copy(_flat(st, capsys, "b"), work / "b")             # and an image file named like image b
    rc, out, err = cli(capsys, *st, "diff", "a", "b")
    assert rc == 0 and out.splitlines() == ["C /f", "A /g"], (out, err)
    rc, out, err = cli(capsys, *st, "diff", "a", "./b")       # with a slash: the image file
    assert rc == 0 and out.splitlines() == ["C /f", "A /g"], (out, err)
    (work / "c").write_bytes(b"x")
    rc, _, err = cli(capsys, *st, "diff", "a", "c")           # no image c, but a file c: say how
    one_error(rc, err, "NotFoundError", "./c")


def _flat(st: list[str], capsys, name: str) -> str:
    assert main([*st, "flatten", name]) == 0
    return capsys.readouterr().out.split()[1]
