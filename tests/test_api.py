"""flatmount.api: the Store users get is the lower store plus the operations, and every operation
returns a frozen dataclass."""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path

import pytest

import flatmount
from flatmount import api
from flatmount.store import core
from tests.tarbuild import Tar

OPERATIONS = ("pull", "flatten", "mount", "bundle", "run", "mounts", "image_file", "diff", "gc", "fsck",
              "usage", "layer_tree")
RESULTS = tuple(op for op in OPERATIONS if op != "layer_tree")   # a layer's tree is an Inode, not a result


def _frozen(obj: object) -> bool:
    return dataclasses.is_dataclass(obj) and obj.__dataclass_params__.frozen  # type: ignore[union-attr]


def _tar(tmp_path: Path, name: str, files: dict[str, bytes]) -> str:
    t = Tar()
    for path, data in files.items():
        t.file(path, data)
    p = tmp_path / name
    p.write_bytes(t.bytes())
    return f"tar:{p}"


def test_open_store_gives_the_facade_over_the_lower_store(tmp_path):
    assert flatmount.open_store is api.open_store
    ais = tmp_path / "ais"
    ais.mkdir()
    with flatmount.open_store(tmp_path / "store", runroot=tmp_path / "run", config=os.devnull,
                              additional=[ais]) as store:
        assert type(store) is api.Store and isinstance(store, core.Store)
        # additional stores are records only: read-only, never operated on
        assert [type(s) for s in store.additional] == [core.Store]
    for op in OPERATIONS:   # the lower store has no operation: it never imports one
        assert callable(getattr(api.Store, op)) and not hasattr(core.Store, op), op


def test_operation_results_are_frozen_dataclasses(tmp_path):
    with flatmount.open_store(tmp_path / "store", runroot=tmp_path / "run", config=os.devnull,
                              additional=[]) as store:
        a = store.pull(_tar(tmp_path, "a.tar", {"etc/a": b"a" * 100}), "a")
        b = store.pull(_tar(tmp_path, "b.tar", {"etc/a": b"a" * 100, "etc/b": b"b" * 100}), "b")
        flat = store.flatten("b")
        changes = store.diff("a", "b")
        results = [a, b, a.image, flat, *changes, store.gc(dry_run=True), store.fsck(), store.usage(),
                   store.remove_image("a")]
        assert "A /etc/b" in [str(c) for c in changes]
        for r in results:
            assert _frozen(r), type(r).__name__
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(r, dataclasses.fields(r)[0].name, None)


def test_every_declared_result_type_is_frozen():
    """The return types the facade declares (resolved from its annotations)."""
    import flatmount.diff
    import flatmount.flatten
    import flatmount.fsck
    import flatmount.gc
    import flatmount.run.bundle
    import flatmount.run.container
    import flatmount.store.batch
    import flatmount.store.leases
    import flatmount.usage

    names = {**vars(api), **vars(flatmount.diff), **vars(flatmount.flatten), **vars(flatmount.fsck),
             **vars(flatmount.gc), **vars(flatmount.run.bundle), **vars(flatmount.run.container),
             **vars(flatmount.store.batch), **vars(flatmount.store.leases), **vars(flatmount.usage),
             **vars(typing)}
    seen = set()
    for op in RESULTS:
        ret = typing.get_type_hints(getattr(api.Store, op), globalns=names)["return"]
        for t in (ret, *typing.get_args(ret)):
            if isinstance(t, type) and t not in (str, int):
                seen.add(t.__name__)
                assert dataclasses.is_dataclass(t) and t.__dataclass_params__.frozen, t
    assert {"PullResult", "FlatImage", "Lease", "Change", "GcResult", "FsckResult", "UsageReport",
            "RunResult", "Bundle"} <= seen
