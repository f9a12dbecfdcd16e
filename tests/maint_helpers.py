"""Test helper for gc/fsck/usage: stores built through the real import path (OCI layouts -> pull).

`content(tag, size)` gives deterministic, distinct file contents (> 64 bytes: stored as objects);
`oci_image(dir, layers)` writes an OCI layout whose layers are given as {path: bytes} dicts, so the
same dict gives the same layer (same diff_id, same layer id) in every image that uses it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from flatmount.api import open_store
from flatmount.store.core import Store
from flatmount.store.records import chain_id
from objects.digest import fsverity_digest
from tests.tarbuild import Tar, make_oci


def content(tag: str, size: int) -> bytes:
    """`size` bytes determined by `tag` (distinct tags give distinct contents)."""
    seed = hashlib.sha256(tag.encode()).digest()
    out = bytearray()
    i = 0
    while len(out) < size:
        out += hashlib.sha256(seed + i.to_bytes(8, "little")).digest()
        i += 1
    return bytes(out[:size])


def objpath(data: bytes) -> str:
    h = fsverity_digest(data).hex()
    return f"{h[:2]}/{h[2:]}"


def layer_tar(files: dict[str, bytes]) -> bytes:
    t = Tar()
    dirs = set()
    for name in sorted(files):
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                t.dir(d + "/")
        t.file(name, files[name])
    return t.bytes()


def oci_image(path: str | os.PathLike, layers: list[dict[str, bytes]], tag: str = "t") -> dict:
    """An OCI layout with one uncompressed tar layer per dict; returns make_oci's info + layer ids."""
    info = make_oci(path, [(layer_tar(f), "none") for f in layers], tag=tag)
    ids, parent = [], None
    for d in info["diff_ids"]:
        parent = chain_id(parent, d)
        ids.append(parent)
    info["layer_ids"] = ids
    return info


def pull_image(store: Store, workdir: str | os.PathLike, name: str, layers: list[dict[str, bytes]]) -> dict:
    """Write an OCI layout for `layers` under workdir and pull it into `store` as `name`."""
    from flatmount.pull import pull

    d = Path(workdir) / f"oci-{name.replace('/', '_').replace(':', '_')}"
    info = oci_image(d, layers)
    res = pull(store, f"oci:{d}:t", name)
    info["image"] = res.image
    return info


def new_store(root: str | os.PathLike, additional: list[str] | None = None) -> Store:
    return open_store(root, additional=additional, runroot=os.path.join(os.fspath(root) + "-run"))


def xyz_store(tmp_path: Path, a: dict, b: dict, c: dict, d: dict) -> Store:
    """The store the maintenance tests share: images x = [a, b], y = [a, c] (a shared base) and z = [d]."""
    s = new_store(tmp_path / "store")
    pull_image(s, tmp_path, "x", [a, b])
    pull_image(s, tmp_path, "y", [a, c])
    pull_image(s, tmp_path, "z", [d])
    return s


def tree_hashes(path: str | os.PathLike) -> dict[str, str]:
    """Every file below `path` (sha256 of content, plus mode/mtime) and every directory."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), path)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            st = os.lstat(p)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = f"{hashlib.sha256(fh.read()).hexdigest()} {st.st_mode:o} {st.st_mtime_ns}"
    return out


def primary_objects(store: Store) -> set[str]:
    from flatmount.store.paths import scan_objects

    return {o for o, _ in scan_objects(store.objects_dir)}


def unmount_all_under(path: str | os.PathLike) -> list[str]:
    """Lazily unmount every mount below `path` (deepest first); returns what was still mounted."""
    import subprocess

    from flatmount.kernel.kmount import mounts, umount_image

    base = os.path.realpath(os.fspath(path)) + os.sep
    left = [m.mountpoint for m in mounts() if m.mountpoint.startswith(base)]
    for mp in sorted(set(left), key=len, reverse=True):
        try:
            umount_image(mp, lazy=True)
        except Exception:  # noqa: BLE001 - teardown must go on
            subprocess.run(["umount", "-l", mp], capture_output=True)
    return left


def refs_as_text(db_path: str | os.PathLike, extra: list[tuple[str, str]] = ()) -> None:
    """Turn a store's refs table into the text layout of schema 2 (as flatmount wrote it before
    flatmount.store.reftable), with `extra` rows added, and mark the DB schema 2."""
    import sqlite3

    from flatmount.store import reftable

    con = sqlite3.connect(db_path)
    try:
        rows = reftable.rows(con)
        con.execute("DROP TABLE refs")
        con.execute("DROP TABLE owners")
        con.execute("CREATE TABLE refs(owner TEXT NOT NULL, object TEXT NOT NULL, PRIMARY KEY(owner, object)) "
                    "WITHOUT ROWID")
        con.execute("CREATE INDEX refs_object ON refs(object)")
        con.executemany("INSERT INTO refs VALUES (?, ?)", [*rows, *extra])
        con.execute("PRAGMA user_version=2")
        con.commit()
    finally:
        con.close()
