"""Audit of issue 13 item 1 against registry pulls: a `pull docker://` that fails mid-way (its last
layer blob corrupt) while an image sharing file contents with it is mounted after `rmi`.  The pull's
rollback removes only the objects it created that nothing needs: every file of the live mount stays
readable, also after gc.  Real registry (FaultServer flips a byte), real mount.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import require_root

from flatmount.errors import FlatmountError
from flatmount.gc import gc
from flatmount.pull import pull
from tests.registry_fixtures import FaultServer
from tests.tarbuild import Tar, make_oci
from tests.test_registry import PLAIN, new_store


def _tar(prefix: str, contents: list[bytes]) -> bytes:
    t = Tar(root=False)
    t.dir(f"{prefix}/", mtime=3)
    for k, data in enumerate(contents):
        t.file(f"{prefix}/f{k:02d}", data, mtime=3)
    return t.bytes()


def test_failed_registry_pull_keeps_objects_of_a_live_mount(registry, tmp_path):
    require_root()
    shared = [hashlib.sha256(b"shared%d" % k).digest() * 40 for k in range(50)]
    own = [hashlib.sha256(b"own%d" % k).digest() * 40 for k in range(5)]
    make_oci(tmp_path / "a", [(_tar("a", shared), "gzip")], tag="v1")
    registry.push(tmp_path / "a", "v1", "lib/a")
    info = make_oci(tmp_path / "b", [(_tar("b", shared + own), "gzip"), (_tar("c", own[::-1]), "zstd")],
                    tag="v1")
    registry.push(tmp_path / "b", "v1", "lib/b")
    fault = FaultServer(registry, corrupt={info["layers"][1]["digest"]})
    with new_store(tmp_path) as s:
        pull(s, f"docker://{registry.host}/lib/a:v1", registry=PLAIN)
        with s.mount(f"{registry.host}/lib/a:v1") as merged:
            try:
                s.remove_image(f"{registry.host}/lib/a:v1")
                with pytest.raises(FlatmountError):
                    pull(s, f"docker://{fault.host}/lib/b:v1", registry=PLAIN)
                gc(s, grace_s=0)
                for k, data in enumerate(shared):
                    assert Path(merged, "a", f"f{k:02d}").read_bytes() == data, k
            finally:
                fault.stop()
        gc(s, grace_s=0)
        assert not [p for p in Path(s.root, "objects").rglob("*") if p.is_file() and not p.name.startswith(".")]
        assert not [ln for ln in open("/proc/self/mountinfo") if str(tmp_path) in ln]
