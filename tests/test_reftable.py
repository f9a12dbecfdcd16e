"""The refs table (flatmount.store.reftable): rows written and read back in the compact layout of
schema 3; the text layout of schema 2 read with the same answers (a store this process only reads is
never migrated); the migration keeps every row that can name an object."""

from __future__ import annotations

import os
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flatmount.gc import gc
from flatmount.store import reftable
from flatmount.store.integrity import layer_damage
from flatmount.store.records import SCHEMA_VERSION
from flatmount.store.refs import needed_by_additional
from flatmount.usage import object_refs, usage
from objects.paths import object_path
from tests.maint_helpers import content, new_store, objpath, primary_objects, pull_image, refs_as_text

OWNERS = ["layer:" + c * 64 for c in "abcd"] + ["flat:" + "e" * 64]
digests = st.binary(min_size=32, max_size=32)
tables = st.dictionaries(st.sampled_from(OWNERS), st.sets(digests, min_size=1, max_size=12), max_size=5)


def _compact_db(path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE refs(owner TEXT NOT NULL, object TEXT NOT NULL, PRIMARY KEY(owner, object)) "
               "WITHOUT ROWID")
    db.execute("CREATE INDEX refs_object ON refs(object)")
    db.execute("BEGIN")
    reftable.migrate_to_compact(db)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    db.execute("COMMIT")
    return db


def _answers(db: sqlite3.Connection, probe: list[str], gone: list[str]) -> dict:
    """Every read of reftable on `db`, as plain values."""
    return {"rows": sorted(reftable.rows(db)), "owners": reftable.owners(db),
            "referenced": reftable.referenced(db), "among": reftable.referenced_among(db, probe),
            "except": reftable.referenced_except(db, gone),
            "of": {o: reftable.objects_of(db, o) for o in OWNERS},
            "owners_of": {p: reftable.owners_of(db, p) for p in probe},
            "rows_of": sorted(reftable.rows_of(db, gone))}


@settings(max_examples=60, deadline=None)
@given(table=tables, extra=st.lists(digests, max_size=4), gone=st.lists(st.sampled_from(OWNERS), max_size=3))
def test_rows_read_back_the_same_in_both_layouts(tmp_path_factory, table, extra, gone):
    path = tmp_path_factory.mktemp("refs") / "t.db"
    db = _compact_db(path)
    try:
        db.execute("BEGIN")
        for owner, ds in table.items():
            reftable.insert(db, owner, [b"".join(sorted(ds))])
            reftable.insert_paths(db, owner, [object_path(d) for d in ds])  # (again: no duplicate rows)
        db.execute("COMMIT")
        want = sorted((o, object_path(d)) for o, ds in table.items() for d in ds)
        probe = sorted({object_path(d) for d in extra} | {p for _, p in want[:3]}) + ["not/an-object"]
        answers = _answers(db, probe, gone)
        assert answers["rows"] == want
        assert answers["owners"] == sorted(table)
        assert answers["referenced"] == {p for _, p in want}
        assert answers["among"] == {p for p in probe if any(p == q for _, q in want)}
        assert answers["except"] == ({p for o, p in want if o not in gone}, sum(o in gone for o, _ in want))
        assert answers["of"] == {o: sorted(p for q, p in want if q == o) for o in OWNERS}
        assert answers["owners_of"] == {p: sorted(o for o, q in want if q == p) for p in probe}
        assert answers["rows_of"] == [r for r in want if r[0] in gone]
    finally:
        db.close()
    refs_as_text(path)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        assert not reftable.compact(db)
        assert _answers(db, probe, gone) == answers
    finally:
        db.close()
    # and removed again, owner by owner, in the compact layout
    db = _compact_db(tmp_path_factory.mktemp("refs") / "t.db")
    try:
        for owner, ds in table.items():
            reftable.insert_paths(db, owner, [object_path(d) for d in ds])
        for owner, ds in table.items():
            assert reftable.delete_owner(db, owner) == len(ds)
            assert reftable.objects_of(db, owner) == [] and owner not in reftable.owners(db)
        assert reftable.rows(db) == [] and db.execute("SELECT count(*) FROM owners").fetchone() == (0,)
    finally:
        db.close()


def test_nothing_inserted_leaves_no_owner(tmp_path):
    db = _compact_db(tmp_path / "t.db")
    try:
        reftable.insert(db, OWNERS[0], [b""])
        assert db.execute("SELECT count(*) FROM owners").fetchone() == (0,)
        with pytest.raises(ValueError, match="malformed object path"):
            reftable.insert_paths(db, OWNERS[0], ["zz/" + "0" * 62])
    finally:
        db.close()


def _two_images(tmp_path):
    store = new_store(tmp_path / "store")
    pull_image(store, tmp_path, "x", [{"a": content("a", 3000), "s": content("shared", 2000)},
                                      {"b": content("b", 4000)}])
    pull_image(store, tmp_path, "y", [{"c": content("c", 5000), "s": content("shared", 2000)}])
    return store


def test_schema_2_store_is_migrated_keeping_every_row_that_names_an_object(tmp_path):
    store = _two_images(tmp_path)
    before = sorted(reftable.rows(store.connect()))
    assert len(before) == 5 and reftable.compact(store.connect())
    objects = primary_objects(store)
    store.close()
    # rows of earlier versions: a flat image's, one naming no object (no file can have that name), and
    # one in capitals (the object it means is the lower-case file)
    upper = ("flat:" + "f" * 64, objpath(content("a", 3000)).upper())
    refs_as_text(store.db_path, [upper, ("layer:" + "9" * 64, "not/an-object")])
    assert os.path.getsize(store.db_path) > 0
    store = new_store(tmp_path / "store")
    try:
        db = store.connect()
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,) and reftable.compact(db)
        assert sorted(reftable.rows(db)) == sorted([*before, (upper[0], upper[1].lower())])
        res = gc(store, grace_s=0)  # the flat: row is dropped as before; nothing else
        assert res.refs_removed == 1 and res.objects_removed == 0 and primary_objects(store) == objects
        assert sorted(reftable.rows(db)) == before
    finally:
        store.close()


def test_schema_2_additional_store_is_read_as_is(tmp_path):
    """An additional store of schema 2 is never written: every question about its refs gets the
    answers its compact copy gives."""
    old = _two_images(tmp_path)
    shared = objpath(content("shared", 2000))
    old_root = str(old.root)
    old.close()

    def answers() -> tuple:
        s = new_store(tmp_path / "primary", additional=[old_root])
        try:
            u = usage(s)
            refs = object_refs(s, shared)
            damage = [layer_damage(s, rec) for rec in s.layers()]
            os.rename(os.path.join(old_root, "objects", shared), os.path.join(tmp_path, "moved"))
            try:
                needed = needed_by_additional(s, [shared, objpath(content("nowhere", 10))])
                lacking = [layer_damage(s, rec) for rec in s.layers()]
            finally:
                os.rename(os.path.join(tmp_path, "moved"), os.path.join(old_root, "objects", shared))
            return (sorted((i.names, i.objects, i.unique_objects, i.shared_objects) for i in u.images),
                    sorted((x.kind, x.id) for x in refs.users), damage, needed, sorted(map(str, lacking)))
        finally:
            s.close()

    compact = answers()
    refs_as_text(os.path.join(old_root, "flatmount.db"))
    text = answers()
    assert text == compact
    assert compact[3] == {shared} and sum(d != "None" for d in compact[4]) == 2
    assert [k for k, _ in compact[1]] == ["image", "image", "layer", "layer"] and compact[2] == [None] * 3
    con = sqlite3.connect(os.path.join(old_root, "flatmount.db"))
    try:  # read, never migrated
        assert con.execute("PRAGMA user_version").fetchone() == (2,)
    finally:
        con.close()



def test_rows_whose_owner_row_is_gone_are_named_by_id_and_can_be_dropped(tmp_path):
    """(Only a damaged DB has them: every write removes an owner's rows and name together.)"""
    db = _compact_db(tmp_path / "t.db")
    try:
        a, b = object_path(b"a" * 32), object_path(b"b" * 32)
        reftable.insert_paths(db, OWNERS[0], [a, b])
        reftable.insert_paths(db, OWNERS[1], [b])
        (oid,) = db.execute("SELECT id FROM owners WHERE name = ?", (OWNERS[0],)).fetchone()
        db.execute("DELETE FROM owners WHERE id = ?", (oid,))
        lost = f"#{oid}"
        assert reftable.owners(db) == sorted([lost, OWNERS[1]])
        assert sorted(reftable.rows(db)) == sorted([(lost, a), (lost, b), (OWNERS[1], b)])
        assert reftable.owners_of(db, b) == sorted([lost, OWNERS[1]])
        assert reftable.referenced_except(db, [lost]) == ({b}, 2)
        assert reftable.delete_owner(db, lost) == 2
        assert reftable.rows(db) == [(OWNERS[1], b)]
    finally:
        db.close()
