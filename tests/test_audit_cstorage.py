"""Audit of issue 13 items 3, 5 and 6 together: c/storage verification meets re-pull repair.

A verified layer that lost an object is repaired by a re-pull of a source that verifies (the OCI
export, or the genuine c/storage layer), never from a planted c/storage layer claiming the same
diff_id: that pull must neither fill the verified layer with planted content nor call it whole.
Real c/storage stores made by podman, real mounts.
"""

from __future__ import annotations

import os

from test_cstorage_verify import GENUINE, IMAGE, PLANTED, _read_mounted, _store

from flatmount.fsck import fsck
from flatmount.pull import pull
from flatmount.sources import cstorage
from flatmount.store.records import chain_id
from tests.maint_helpers import objpath


def test_lost_object_of_a_verified_layer_is_not_refilled_from_a_planted_layer(cstore, tmp_path):
    genuine_id = chain_id(None, cstore.layer.diff_id)
    store = _store(tmp_path)
    try:
        got = pull(store, f"oci:{cstore.oci}")
        assert got.imported == (genuine_id,)
        os.unlink(store.objects_dir / objpath(GENUINE))
        assert not fsck(store).ok
        os.chmod(cstore.diff / "etc" / "motd", 0o644)
        (cstore.diff / "etc" / "motd").write_bytes(PLANTED)
        cstorage.pull_cstorage(store, f"containers-storage:{IMAGE}", storage_conf=cstore.conf)
        assert store.resolve_image(IMAGE).top_layer == genuine_id
        assert not (store.objects_dir / objpath(GENUINE)).exists()
        assert not fsck(store).ok          # still missing: not called whole, not planted
        res = pull(store, f"oci:{cstore.oci}")  # the verified source repairs it
        assert res.imported == (genuine_id,)
        assert fsck(store).ok or all(p.kind == "unverified-layer" for p in fsck(store).problems)
        assert _read_mounted(store, IMAGE, "etc/motd") == GENUINE
    finally:
        store.close()


def test_lost_object_is_repaired_by_a_genuine_cstorage_repull(cstore, tmp_path):
    genuine_id = chain_id(None, cstore.layer.diff_id)
    store = _store(tmp_path)
    try:
        rec = cstorage.pull_cstorage(store, f"containers-storage:{IMAGE}", storage_conf=cstore.conf)
        assert rec.top_layer == genuine_id
        os.unlink(store.objects_dir / objpath(GENUINE))
        assert not fsck(store).ok
        cstorage.pull_cstorage(store, f"containers-storage:{IMAGE}", storage_conf=cstore.conf)
        assert fsck(store).ok
        assert _read_mounted(store, IMAGE, "etc/motd") == GENUINE
    finally:
        store.close()
