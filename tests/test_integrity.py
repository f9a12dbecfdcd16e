"""Integrity hardening: failed-import rollback, damaged metadata DBs, verification of layer and
flattened images, re-pull repair.  Real files, real tars, real mounts."""

from __future__ import annotations

import os

import pytest

from flatmount.errors import LayerError
from flatmount.pull import pull
from tests.conftest import require_root
from tests.maint_helpers import (
    content,
    layer_tar,
    new_store,
    objpath,
    primary_objects,
    pull_image,
    unmount_all_under,
)


@pytest.fixture
def store(tmp_path):
    s = new_store(tmp_path / "store")
    yield s
    s.close()
    assert not unmount_all_under(tmp_path), "a test left a mount behind"


def _unreadable(merged: str, files: dict[str, bytes]) -> list[str]:
    bad = []
    for name, data in files.items():
        try:
            with open(os.path.join(merged, name), "rb") as f:
                if f.read() != data:
                    bad.append(name)
        except OSError:
            bad.append(name)
    return bad


# --- item 1: a failed import removes only what it created --------------------------------------------

@pytest.mark.parametrize("nfiles", [50, 400])   # 400: past objects.bulk.START_AFTER, helper processes
def test_failed_import_keeps_objects_a_live_mount_reads(store, tmp_path, nfiles):
    """Pull x, mount it, rmi x, then at once a pull that fails (truncated tar) whose files include x's
    content: its rollback must not delete x's objects (it found them stored, it did not create them),
    and must delete the objects it did create."""
    require_root()
    files = {f"f/{i}": content(f"x{i}", 100 + i) for i in range(nfiles)}
    pull_image(store, tmp_path, "x", [files])
    x_objects = {objpath(v) for v in files.values()}
    lease = store.mount("x")
    merged = lease.__enter__()
    try:
        store.remove_image("x")
        # the same contents under other names, then new ones; cut inside the last new file
        other = {f"g/{i}": v for i, v in enumerate(files.values())}
        fresh = {f"h/{i}": content(f"new{i}", 300 + i) for i in range(20)}
        data = layer_tar({**other, **fresh})
        cut = data.rindex(fresh["h/19"][:64]) + 100
        (tmp_path / "bad.tar").write_bytes(data[:cut])
        with pytest.raises(LayerError, match="truncated|ends inside"):
            pull(store, f"tar:{tmp_path / 'bad.tar'}", "bad")
        assert _unreadable(merged, files) == []
        present = primary_objects(store)
        assert x_objects <= present
        # what the failed import created itself is gone again
        assert not present & {objpath(v) for v in fresh.values()}
    finally:
        lease.__exit__(None, None, None)
