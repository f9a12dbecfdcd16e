"""The refs table: which objects each owner (`layer:<id>`; `flat:<digest>` rows of early versions)
needs, one row per owner and object.  Every read and write of it goes through here, so that its
layout is known in one place.

Layout (schema 3): `owners(id, name)` and `refs(owner, object)`, the owner an integer and the object
its 32-byte digest, indexed both ways.  Schema 2 held both as text (`layer:<64 hex>`, `XX/<62 hex>`):
a layer of 50,000 small files wrote 16 MB of table and index pages, which its import's commit wrote
twice (WAL, then checkpoint); now 4.4 MB.  A store of schema 2 that this process only reads (an
additional store, a read-only primary) is never migrated, so every query here reads both layouts.

Objects come and go as `XX/<62 hex>` paths (objects.paths), as everywhere else.
"""

from __future__ import annotations

from itertools import repeat
from operator import itemgetter

from objects import paths as objpaths

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: CLI start-up, see objects/lazy.py)

if TYPE_CHECKING:  # pragma: no cover
    import sqlite3
    from collections.abc import Iterable, Iterator

COMPACT_SINCE = 3  # the schema version that stores refs as (owner id, digest)

# a blob of concatenated digests (?1) as rows `d`: one statement inserts or looks up any number of
# them (no variable limit, nothing parsed); the caller never passes an empty blob
_DIGEST_ROWS = ("WITH RECURSIVE k(i) AS (SELECT 0 UNION ALL SELECT i + 32 FROM k WHERE i + 32 < length(?1)) "
                "SELECT substr(?1, i + 1, 32) AS d FROM k")
_JSON_IN = "(SELECT value FROM json_each(?))"
# the ids of the owners named in a JSON list (?1); `#<id>`: rows whose owner row is gone (`_names`)
_IDS_IN = ("(SELECT id FROM owners WHERE name IN (SELECT value FROM json_each(?1)) UNION "
           "SELECT CAST(substr(value, 2) AS INTEGER) FROM json_each(?1) "
           "WHERE value GLOB '#[0-9]*' AND NOT substr(value, 2) GLOB '*[^0-9]*')")


def compact(db: sqlite3.Connection) -> bool:
    """Whether `db` holds refs in the schema-3 layout (asked each time: a store read while another
    process migrates it changes layout under an open connection)."""
    return db.execute("PRAGMA user_version").fetchone()[0] >= COMPACT_SINCE


def digest_of(path: str) -> bytes:
    """The 32-byte digest an object path names; ValueError if it is not `XX/<62 hex>`."""
    if not objpaths.OBJPATH_RE.fullmatch(path):
        raise ValueError(f"malformed object path {path!r}")
    return bytes.fromhex(path[:2] + path[3:])


def digests_blob(paths: Iterable[str]) -> bytes:
    """Object paths as one blob of digests, sorted (the order the index takes them fastest)."""
    return b"".join(sorted({digest_of(p) for p in paths}))


def _paths(digests: Iterable[bytes]) -> Iterator[str]:
    """`XX/<62 hex>` of each digest, in C (`bytes.hex` with a "/" before the last 31 bytes): gc reads
    every digest of the store, and SQL's hex() or a Python loop took 1.5-4 times as long."""
    return map(bytes.hex, digests, repeat("/"), repeat(31))


def _firsts(rows: Iterable[tuple]) -> Iterator:
    return map(itemgetter(0), rows)


def _names(db: sqlite3.Connection) -> dict[int, str]:
    """Owner id -> name (one row per layer, read whole: a join per refs row cost gc 0.1 s per
    200,000 rows); an id without a name (its row lost) reads as `#<id>` (`_name`)."""
    return dict(db.execute("SELECT id, name FROM owners"))


def _name(names: dict[int, str], oid: int) -> str:
    return names.get(oid) or f"#{oid}"


# --- reads ---------------------------------------------------------------------------------------

def referenced(db: sqlite3.Connection) -> set[str]:
    """Every object some refs row names."""
    if compact(db):
        return set(_paths(_firsts(db.execute("SELECT DISTINCT object FROM refs"))))
    return set(_firsts(db.execute("SELECT DISTINCT object FROM refs")))


def referenced_among(db: sqlite3.Connection, paths: Iterable[str]) -> set[str]:
    """Those of `paths` that some refs row names (a malformed path: none)."""
    paths = list(paths)
    if not paths:
        return set()
    if compact(db):
        blob = digests_blob(p for p in paths if objpaths.OBJPATH_RE.fullmatch(p))
        if not blob:
            return set()
        return set(_paths(_firsts(db.execute(f"SELECT DISTINCT d FROM ({_DIGEST_ROWS}) "
                                             "WHERE EXISTS (SELECT 1 FROM refs WHERE object = d)", (blob,)))))
    import json

    return set(_firsts(db.execute(f"SELECT DISTINCT object FROM refs WHERE object IN {_JSON_IN}",
                                  (json.dumps(paths),))))


def referenced_except(db: sqlite3.Connection, owners: Iterable[str]) -> tuple[set[str], int]:
    """(objects named by rows of owners other than `owners`, the number of rows of `owners`)."""
    import json

    param = (json.dumps(sorted(owners)),)
    if compact(db):
        live = set(_paths(_firsts(db.execute(f"SELECT DISTINCT object FROM refs WHERE owner NOT IN {_IDS_IN}",
                                             param))))
        n = db.execute(f"SELECT count(*) FROM refs WHERE owner IN {_IDS_IN}", param).fetchone()[0]
    else:
        live = set(_firsts(db.execute(f"SELECT DISTINCT object FROM refs WHERE owner NOT IN {_JSON_IN}", param)))
        n = db.execute(f"SELECT count(*) FROM refs WHERE owner IN {_JSON_IN}", param).fetchone()[0]
    return live, n


def owners(db: sqlite3.Connection) -> list[str]:
    """Every owner that has rows, sorted."""
    if compact(db):
        names = _names(db)
        return sorted(_name(names, oid) for oid in _firsts(db.execute("SELECT DISTINCT owner FROM refs")))
    return list(_firsts(db.execute("SELECT DISTINCT owner FROM refs ORDER BY owner")))


def rows(db: sqlite3.Connection) -> list[tuple[str, str]]:
    """Every row as (owner, object path)."""
    if compact(db):
        names = _names(db)
        return [(_name(names, oid), d.hex("/", 31)) for oid, d in db.execute("SELECT owner, object FROM refs")]
    return db.execute("SELECT owner, object FROM refs").fetchall()


def rows_of(db: sqlite3.Connection, owners: Iterable[str]) -> Iterator[tuple[str, str]]:
    """The rows of `owners`, as (owner, object path)."""
    import json

    param = (json.dumps(list(owners)),)
    if compact(db):
        return ((o, d.hex("/", 31)) for o, d in db.execute(
            f"SELECT o.name, r.object FROM owners o JOIN refs r ON r.owner = o.id WHERE o.name IN {_JSON_IN}",
            param))
    return db.execute(f"SELECT owner, object FROM refs WHERE owner IN {_JSON_IN}", param)


def objects_of(db: sqlite3.Connection, owner: str) -> list[str]:
    """The objects `owner` needs, sorted."""
    if compact(db):
        return list(_paths(_firsts(db.execute(
            "SELECT r.object FROM owners o JOIN refs r ON r.owner = o.id WHERE o.name = ? ORDER BY r.object",
            (owner,)))))
    return list(_firsts(db.execute("SELECT object FROM refs WHERE owner = ? ORDER BY object", (owner,))))


def owners_of(db: sqlite3.Connection, path: str) -> list[str]:
    """The owners that need the object at `path`, sorted."""
    if compact(db):
        try:
            digest = digest_of(path)
        except ValueError:
            return []
        names = _names(db)
        return sorted(_name(names, oid) for oid in _firsts(db.execute("SELECT owner FROM refs WHERE object = ?",
                                                                       (digest,))))
    return list(_firsts(db.execute("SELECT owner FROM refs WHERE object = ? ORDER BY owner", (path,))))


# --- writes (a writable store: always the compact layout) -----------------------------------------

def _owner_id(db: sqlite3.Connection, owner: str) -> int:
    db.execute("INSERT OR IGNORE INTO owners(name) VALUES (?)", (owner,))
    return db.execute("SELECT id FROM owners WHERE name = ?", (owner,)).fetchone()[0]


def insert(db: sqlite3.Connection, owner: str, blobs: Iterable[bytes]) -> None:
    """Rows of `owner` for the digests in `blobs` (each a run of concatenated 32-byte digests, best
    sorted: `digests_blob`); rows it has already stay.  One statement per blob: a layer of 50,000
    small files spent a quarter second binding one row at a time."""
    blobs = [b for b in blobs if b]
    if not blobs:  # (no owner row without rows: gc finds owners by their rows)
        return
    oid = _owner_id(db, owner)
    sql = f"INSERT OR IGNORE INTO refs(owner, object) SELECT ?2, d FROM ({_DIGEST_ROWS})"
    for blob in blobs:
        db.execute(sql, (blob, oid))


def insert_paths(db: sqlite3.Connection, owner: str, paths: Iterable[str]) -> None:
    """`insert` of object paths."""
    insert(db, owner, (digests_blob(paths),))


def delete_owner(db: sqlite3.Connection, owner: str) -> int:
    """Remove every row of `owner` (and its name); returns how many rows went."""
    if owner.startswith("#") and owner[1:].isdigit():  # rows whose owner row was lost (`_names`)
        return db.execute("DELETE FROM refs WHERE owner = ?", (int(owner[1:]),)).rowcount
    row = db.execute("SELECT id FROM owners WHERE name = ?", (owner,)).fetchone()
    if row is None:
        return 0
    n = db.execute("DELETE FROM refs WHERE owner = ?", (row[0],)).rowcount
    db.execute("DELETE FROM owners WHERE id = ?", (row[0],))
    return n


# --- the migration to the compact layout -----------------------------------------------------------

def _path_digest(path: object) -> bytes | None:
    """The migration's text -> digest: None for text that names no object (no object file can have
    that name, so the row protected nothing)."""
    if not isinstance(path, str):
        return None
    try:
        return digest_of(path.lower())
    except ValueError:
        return None


def migrate_to_compact(db: sqlite3.Connection) -> None:
    """Schema 2 -> 3, inside the caller's transaction: the same owners and objects, as ids and digests
    (AUTOINCREMENT: an id is never given to a second owner, so a row left of a removed owner can
    never be taken for a new one's)."""
    db.create_function("flatmount_path_digest", 1, _path_digest, deterministic=True)
    for stmt in (
        "CREATE TABLE owners(id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE)",
        "INSERT INTO owners(name) SELECT DISTINCT owner FROM refs ORDER BY owner",
        "CREATE TABLE refs_compact(owner INTEGER NOT NULL, object BLOB NOT NULL, PRIMARY KEY(owner, object)) "
        "WITHOUT ROWID",
        "INSERT OR IGNORE INTO refs_compact(owner, object) SELECT o.id, d FROM "
        "(SELECT owner, flatmount_path_digest(object) AS d FROM refs) t JOIN owners o ON o.name = t.owner "
        "WHERE d IS NOT NULL ORDER BY o.id, d",
        "DROP TABLE refs",
        "ALTER TABLE refs_compact RENAME TO refs",
        "CREATE INDEX refs_object ON refs(object)",
        "DELETE FROM owners WHERE id NOT IN (SELECT owner FROM refs)",  # (all its rows named no object)
    ):
        db.execute(stmt)
