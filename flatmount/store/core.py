"""The lower store: one store directory (primary, writable; or additional, read-only), its SQLite
records, transactions and paths.  No operation lives here: pull, flatten, mount, gc, ... take this
Store (flatmount.api.Store adds them as methods), so the store never imports an operation.

Why one class for every store: every part (import, flatten, mount, diff, gc) needs the same answers
(which store holds this layer, where are its objects, which image does this name mean), and the rules
for writing safely (one transaction per import, GC lock, temp + fsync + rename) must be the same for
all.  The rest of the store layer, by concern: config (storage.conf, default roots), records (schema,
record types, chain ids), names (image names), locks, paths (the layout below), leases, containers,
reftable (the refs table's rows), refs (what is referenced), integrity (checked files), batch (imports).

Layout of a store directory (primary and additional stores alike):
    flatmount.db            SQLite (WAL), schema below, versioned with PRAGMA user_version
    objects/XX/<62 hex>     content-addressed file content (objects.ObjectStore)
    layers/<layer id>.erofs layer metadata images (whiteouts kept)
    images/<sha256>.erofs   flattened images (content-addressed)
    tmp/                    temp files of running writers (cleaned when stale, see `clean_tmp`)
    gc.lock                 flock: writers hold it shared from their first object put to their commit

Configuration: flatmount.store.config.

Additional stores are flatmount stores opened strictly read-only: nothing in them is ever created or
written (no DB journal, no lock file).  Their DB is opened with `mode=ro&immutable=1` unless a writer
of that store is live (its `-wal` and `-shm` files exist), in which case plain `mode=ro` reads through
the writer's WAL; on a read-only mount it is always `immutable=1`.

Integrity: a primary's DB is created before anything else is written, so an empty (0-byte, schema-
less) or missing DB beside layer images or objects means lost records: every writable open refuses
it rather than starting afresh (which would make every layer image an orphan and every object gc's
garbage).  gc, rmi and imports run SQLite's quick_check of the whole DB first, every other write
that of the small tables (WRITE_CHECK_TABLES), once per process until another process commits
(`require_sound_db`); fsck runs integrity_check.  Schema 2 records each layer image's sha256 and
the `verified` stamps of flatmount.store.integrity; schema 3 keeps refs rows as ids and digests
(flatmount.store.reftable, which also reads the text rows of schema 2 in stores it only reads).

Image names: a stored name always carries a tag or digest; `foo` is stored as `foo:latest`
(flatmount.store.names).  `resolve_image(ref)` tries, as containers/storage does: a full image id (64 hex,
`sha256:` prefix allowed), then the name (as given, with `:latest` added if it has no tag, then with
`localhost/` in front), then a unique id prefix of at least 3 hex digits.  Primary first, then each
additional store in order; a name in the primary shadows the same name in an additional store.  A
name recorded in the primary may point at an image of an additional store (`tag`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time

from flatmount.errors import NotFoundError, ReadOnlyStoreError, StoreError
from flatmount.store import reftable
from flatmount.store.config import default_root, default_runroot, load_config
from flatmount.store.locks import GC_LOCK
from flatmount.store.names import name_candidates, normalise_name
from flatmount.store.paths import DB_NAME
from flatmount.store.records import (
    DB_ADVICE,
    MIGRATIONS,
    SCHEMA,
    SCHEMA_VERSION,
    WRITE_CHECK_TABLES,
    ImageRecord,
    LayerRecord,
    RemovedImage,
)
from objects import paths as objpaths
from objects.paths import is_hex

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: CLI start-up, see objects/lazy.py)

if TYPE_CHECKING:  # pragma: no cover
    import sqlite3
    from collections.abc import Iterator, Sequence
    from pathlib import Path
    from typing import Any

    from objects import ObjectStore

BUSY_TIMEOUT_MS = 30_000
ROOT_MODE = 0o700          # like c/storage's graphroot: other users have no business in a store
SUBDIR_MODE = 0o755        # objects/, layers/, images/: overlayfs reads them with the mounter's creds
TMP_MODE = 0o700
STALE_TMP_AGE_S = 24 * 3600  # tmp files of writers that may still run are removed only after this


def _check_access(root: str) -> None:
    """StoreError up front when this user cannot read the store at all (another user's 0700 store):
    one clear message instead of a PermissionError from whichever file a command touches first."""
    try:
        st = os.stat(root)
    except FileNotFoundError:
        return  # created on the first write
    except OSError as e:
        raise StoreError(f"cannot use store {root}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"store {root} is not a directory")
    if not os.access(root, os.R_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        raise StoreError(f"cannot use store {root}: Permission denied (it belongs to uid {st.st_uid}, "
                         "mode {:o}): run as a user who may read it, or choose another with --root"
                         .format(stat.S_IMODE(st.st_mode)))


def open_store(root: str | os.PathLike | None = None, additional: Sequence[str | os.PathLike] | None = None,
               runroot: str | os.PathLike | None = None, config: str | os.PathLike | None = None,
               readonly: bool = False, store_class: type[Store] | None = None) -> Store:
    """The primary store plus its additional stores, from arguments, then config file, then defaults.

    Nothing is created here: the primary's directories appear on its first write.  `store_class`: the
    class of the primary (flatmount.api.Store, the one users see, adds the operations); additional
    stores are plain records (never written, never operated on).
    """
    cfg = load_config(config)
    root_s = os.fspath(root) if root is not None else (cfg.root or default_root())
    runroot_s = os.fspath(runroot) if runroot is not None else (cfg.runroot or default_runroot())
    ais = [os.fspath(a) for a in additional] if additional is not None else list(cfg.additional)
    _check_access(root_s)
    if os.path.exists(runroot_s) and not os.path.isdir(runroot_s):
        raise StoreError(f"runtime directory {runroot_s} exists but is not a directory (choose another "
                         "with --runroot or runroot in storage.conf)")
    primary = (store_class or Store)(root_s, runroot_s, readonly=readonly)
    primary.check_paths()
    seen = {os.path.realpath(primary.root_str)}
    for a in ais:
        real = os.path.realpath(a)
        if real in seen:
            raise StoreError(f"additional store {a} is the primary store or listed twice")
        seen.add(real)
        if not os.path.isdir(a):
            raise StoreError(f"additional store {a} does not exist or is not a directory")
        extra = Store(a, runroot_s, readonly=True, is_additional=True)
        if not os.path.lexists(extra.db_file) and _has_entries(a):
            # (an empty dir is an empty store: nothing in it to misread)
            raise StoreError(f"additional store {a} is not a flatmount store (it has files but no "
                             f"{DB_NAME}): give a store directory flatmount wrote (`flatmount --root DIR "
                             "pull ...`); a containers-storage store is read with `pull containers-storage:`")
        extra.check_paths()
        primary.additional.append(extra)
    return primary


def _has_entries(path: str) -> bool:
    """Whether directory `path` lists anything (unreadable counts as not: the DB open reports it)."""
    try:
        with os.scandir(path) as it:
            return any(True for _ in it)
    except OSError:
        return False


# --- the store -------------------------------------------------------------------------------------

_open_dbs = 0   # DB connections this process's stores hold open (see `open_connections`)


def open_connections() -> int:
    """How many store DB connections this process holds open.  At 0 no SQLite connection is left for
    the interpreter's teardown to close (flatmount.cli.run may then skip that teardown)."""
    return _open_dbs


def _as_path(path: str) -> Path:
    """`path` as a Path: the Store keeps its paths as str (pathlib costs CLI start-up), and the
    properties that give Paths make them on demand."""
    from pathlib import Path

    return Path(path)


class Store:
    """One flatmount store directory; the primary one also carries `additional` (read-only) stores.

    Read methods (`images`, `layers`, `resolve_image`, `layer`, ...) look at the primary first, then
    each additional store.  Writes go to the primary only (ReadOnlyStoreError on a read-only store).
    """

    def __init__(self, root: str | os.PathLike, runroot: str | os.PathLike | None = None, *,
                 readonly: bool = False, is_additional: bool = False):
        # the paths as str; `root`, `runroot` (and db_path, ...) give them as pathlib.Path, made on first
        # use: pathlib with its re, fnmatch and urllib.parse is a third of a `flatmount mount`'s imports
        self.root_str = os.path.abspath(os.fspath(root))
        self.runroot_str = (os.path.abspath(os.fspath(runroot)) if runroot is not None
                            else os.path.join(self.root_str, "run"))
        self.db_file = os.path.join(self.root_str, DB_NAME)   # db_path as str
        self.tmp_str = os.path.join(self.root_str, "tmp")     # tmp_dir as str
        self.objects_str = os.path.join(self.root_str, "objects")   # objects_dir as str
        self.layers_str = os.path.join(self.root_str, "layers")     # layers_dir as str
        self._paths: tuple[Path, Path] | None = None
        self.readonly = readonly or is_additional
        self.is_additional = is_additional
        self.additional: list[Store] = []
        self._db: sqlite3.Connection | None = None
        self._objects: ObjectStore | None = None
        self._write_opened = False
        self._dirs_made = False
        self._has_image_digest: tuple[object, bool] | None = None   # (connection, column present)
        self._db_sound: tuple[int, bool] | None = None   # (data_version, full) of the last passed check

    def __repr__(self) -> str:
        kind = "additional" if self.is_additional else ("read-only" if self.readonly else "primary")
        return f"<Store {kind} {self.root_str}>"

    # --- paths ------------------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        """The store's directory (`root_str` as a Path)."""
        return (self._paths or self._make_paths())[0]

    @property
    def runroot(self) -> Path:
        """The runtime directory: mounts' dirs and locks (`runroot_str` as a Path)."""
        return (self._paths or self._make_paths())[1]

    def _make_paths(self) -> tuple[Path, Path]:
        self._paths = (_as_path(self.root_str), _as_path(self.runroot_str))
        return self._paths

    @property
    def db_path(self) -> Path:
        return self.root / DB_NAME

    @property
    def objects_dir(self) -> Path:
        return _as_path(self.objects_str)

    @property
    def layers_dir(self) -> Path:
        return _as_path(self.layers_str)

    @property
    def tmp_dir(self) -> Path:
        return _as_path(self.tmp_str)

    def layer_image_path(self, layer_id: str) -> str:
        return os.path.join(self.layers_str, f"{layer_id}.erofs")

    def object_dirs(self) -> list[str]:
        """Object directories to back a mount: the primary's, then each additional store's."""
        return [s.objects_str for s in (self, *self.additional)]

    def find_object(self, objpath: str) -> str | None:
        """Absolute path of object `XX/<62 hex>` in the first store that has it, else None."""
        if not objpaths.OBJPATH_RE.fullmatch(objpath):
            raise StoreError(f"not an object path: {objpath!r} (want XX/<62 hex>)")
        for d in self.object_dirs():
            p = os.path.join(d, objpath)
            if os.path.isfile(p):
                return p
        return None

    # --- objects ----------------------------------------------------------------------------------
    @property
    def objects(self) -> ObjectStore:
        """This store's ObjectStore (read-only for additional/read-only stores)."""
        if self._objects is None:
            from objects import ObjectStore
            from objects.errors import ObjectStoreError

            if self.readonly:
                try:
                    self._objects = ObjectStore(self.objects_str, readonly=True)
                except ObjectStoreError as e:
                    raise StoreError(f"store {self.root_str}: {e}") from None
            else:
                self.ensure_writable()
                self._objects = ObjectStore(self.objects_str)
        return self._objects

    # --- path safety (flatmount.safepath) ---------------------------------------------------------
    _DIR_ENTRIES = ("objects", "objects/.tmp", "layers", "images", "tmp")
    _FILE_ENTRIES = (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", GC_LOCK)

    def check_paths(self) -> None:
        """Refuse a store another user could redirect: every directory on the way to the root is root's
        or the caller's and writable by nobody else, the root is the caller's (root's too for a
        read-only or additional store), its internal entries are real files/directories, never
        symlinks.  A primary root of the caller readable by others (0755) is changed to 0700, with
        a warning: object contents are not for other users.  Nothing is created."""
        import flatmount.safepath as safepath
        own = not self.readonly
        if safepath.check_dir(self.root_str, self._what(), own=own, private=not self.is_additional,
                              fix=True):
            self._check_entries()

    def _what(self) -> str:
        return "additional store" if self.is_additional else "store root"

    def _check_entries(self) -> None:
        import flatmount.safepath as safepath
        what, root, own = f"{self._what()} {self.root_str}", self.root_str, not self.readonly
        for name in self._DIR_ENTRIES:
            safepath.check_entry(root, name, "dir", what, own=own)
        for name in self._FILE_ENTRIES:
            safepath.check_entry(root, name, "file", what, own=own)

    # --- write-open -------------------------------------------------------------------------------
    def ensure_writable(self, clean: bool = True) -> None:
        """Create the primary's directories if needed; on the first write in this process, clean tmp.

        `clean=False` (a mount's lease row): not the cleaning yet, which costs a process that writes
        one small row more than its write (the object store's code, a scan of tmp/, a check of the
        DB); the next write-open of this or any process does it.  A store without a DB yet is
        write-opened in full all the same."""
        if self.readonly:
            what = "an additional store" if self.is_additional else "opened read-only"
            raise ReadOnlyStoreError(f"store {self.root_str} is {what}: it cannot be written")
        if self._write_opened or (self._dirs_made and not clean):
            return
        import flatmount.safepath as safepath
        try:
            safepath.make_dir(self.root_str, "store root", ROOT_MODE, private=True, fix=True)
            self._check_entries()
            for sub in ("objects", "layers", "images"):
                _mkdir(os.path.join(self.root_str, sub), SUBDIR_MODE)
            _mkdir(self.tmp_str, TMP_MODE)
            self._check_entries()
        except OSError as e:
            raise StoreError(f"cannot create store {self.root_str}: {e.strerror}") from None
        self._dirs_made = True
        if not clean and os.path.exists(self.db_file):
            return
        self._write_opened = True
        if not os.path.exists(self.db_file):
            self.connect()  # the DB exists before any object: an empty DB then always means lost records
        self.clean_tmp()

    def clean_tmp(self) -> int:
        """Remove what crashed writers left (returns how many entries went).

        Writers hold gc.lock shared while their temp files exist, so when the exclusive lock is free
        nothing is in flight: every temp file, object temp file and layer image without a record is
        stale.  Otherwise only entries of `tmp/` nobody holds an flock on and older than a day go.
        """
        if self.readonly:
            raise ReadOnlyStoreError(f"store {self.root_str} is read-only: cannot clean it")
        if not os.path.isdir(self.root_str):
            return 0
        removed = 0
        with self._try_exclusive_gc() as idle:
            cutoff = None if idle else time.time() - STALE_TMP_AGE_S
            removed += self._clean_tmp_dir(cutoff)
            if os.path.isdir(self.objects_str):
                try:
                    removed += self.objects.clean_temp(0 if idle else STALE_TMP_AGE_S)
                except Exception as e:  # noqa: BLE001 - cleaning is best effort
                    if not _is_object_store_error(e):
                        raise
            if idle and os.path.exists(self.db_file):
                self.require_sound_db("remove layer images without a record", full=False,
                                      tables=WRITE_CHECK_TABLES)
                removed += self._remove_orphan_layer_files()
        return removed

    def _clean_tmp_dir(self, cutoff: float | None) -> int:
        """The stale entries of tmp/, found and removed through its directory fd (O_NOFOLLOW): a tmp/
        swapped for a symlink is refused, an entry swapped for one is removed itself."""
        from flatmount.safepath import open_dir_nofollow

        dfd = open_dir_nofollow(self.tmp_str, f"store {self.root_str}")
        if dfd is None:
            return 0
        removed = 0
        try:
            with os.scandir(dfd) as it:
                names = [e.name for e in it]
            for name in names:
                if _remove_stale(dfd, name, cutoff):
                    removed += 1
        finally:
            os.close(dfd)
        return removed

    def _remove_orphan_layer_files(self) -> int:
        """Layer images (and their tree caches) renamed into place by an import killed before its
        commit; files of no layer's name shape."""
        from flatmount.safepath import open_dir_nofollow

        dfd = open_dir_nofollow(self.layers_str, f"store {self.root_str}")
        if dfd is None:
            return 0
        try:
            names = os.listdir(dfd)
            known = {r[0] for r in self.connect().execute("SELECT id FROM layers")}
            n = 0
            for name in names:
                lid = name[:-6] if name.endswith(".erofs") else name[:-5] if name.endswith(".tree") else None
                if lid is None or (is_hex(lid, 64) and lid not in known):
                    with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                        os.unlink(name, dir_fd=dfd)
                        n += 1
        finally:
            os.close(dfd)
        return n

    # --- database ---------------------------------------------------------------------------------
    def connect(self) -> sqlite3.Connection:
        """This store's DB connection (cached; autocommit mode, use `transaction()` to write).

        The primary's DB (and its directories) are created on first use; a read-only or additional
        store without a DB yields an empty in-memory DB with the schema.
        """
        db = self._db
        if db is not None:
            try:
                db.total_changes  # noqa: B018 - raises if someone closed it
                return db
            except Exception:  # noqa: BLE001
                self._forget_db()
        from flatmount.store.sqlite import sqlite3

        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                if self.readonly:
                    db = self._connect_readonly(sqlite3)
                else:
                    if not os.path.exists(self.db_file):
                        self.ensure_writable()
                    db = self._connect_writable(sqlite3)
                break
            except sqlite3.OperationalError as e:
                # opening can meet SQLITE_BUSY without the busy handler (another process switching
                # the WAL on or recovering it): wait and try again, like the busy timeout would
                if ("locked" not in str(e) and "busy" not in str(e)) or time.monotonic() > deadline:
                    raise StoreError(f"cannot open the database of store {self.root_str}: {e}") from None
                time.sleep(0.01)
            except sqlite3.Error as e:
                raise StoreError(f"cannot open the database of store {self.root_str}: {e}"
                                 + (DB_ADVICE if _is_corruption(e) else "")) from None
            except OSError as e:  # e.g. a store of another user: EACCES on its directory
                where = f" ({os.fsdecode(e.filename)})" if e.filename is not None else ""
                raise StoreError(f"cannot open the database of store {self.root_str}: {e.strerror}{where}"
                                 + (": run as a user who may read the store, or choose another one "
                                    "with --root" if isinstance(e, PermissionError) else "")) from None
        self._db = db
        global _open_dbs
        _open_dbs += 1
        return db

    def _forget_db(self) -> None:
        global _open_dbs
        self._db = None
        self._db_sound = None   # (data_version counts per connection)
        _open_dbs -= 1

    # --- database integrity -----------------------------------------------------------------------
    def data_besides_db(self) -> str | None:
        """What the store holds besides its DB ("2 layer images, objects"), or None.  A DB that is
        empty (0 bytes, no schema) or missing while this is not None has lost the store's records:
        written to, it would make every layer image an orphan and every object garbage."""
        found = []
        for d, label in ((self.layers_str, "layer images"),
                         (os.path.join(self.root_str, "images"), "flattened images")):
            try:
                with os.scandir(d) as it:
                    n = sum(1 for e in it if e.name.endswith(".erofs"))
            except OSError:
                n = 0
            if n:
                found.append(f"{n} {label}")
        from flatmount.store.paths import scan_objects

        if next(scan_objects(self.objects_str), None) is not None:
            found.append("objects")
        return ", ".join(found) or None

    def db_problems(self, full: bool = False, tables: Sequence[str] = ()) -> list[str]:
        """What is wrong with this store's DB ([] when sound): empty while the store holds data, or what
        SQLite's own check finds (`full`: PRAGMA integrity_check, else quick_check; `tables`: only
        those tables and their indexes)."""
        from flatmount.store.sqlite import sqlite3

        if not os.path.exists(self.db_file) or _db_empty(self.db_file):
            data = self.data_besides_db()
            what = "missing" if not os.path.exists(self.db_file) else "empty"
            return [f"database {self.db_file} is {what} but the store holds {data}"] if data else []
        try:
            db = self.connect()
            if db.execute("PRAGMA user_version").fetchone()[0] == 0:
                data = self.data_besides_db()
                return [f"database {self.db_file} has no schema but the store holds {data}"] if data else []
            pragma = "integrity_check" if full else "quick_check"
            rows: list[str] = []
            for t in tables or (None,):
                rows += [r[0] for r in db.execute(f"PRAGMA {pragma}" + (f"({t})" if t else ""))]
        except StoreError as e:
            return [str(e)]
        except sqlite3.Error as e:
            return [f"database {self.db_file}: {e}"]
        return [] if rows == ["ok"] * len(rows) else [r for r in rows if r != "ok"]

    def require_sound_db(self, what: str, full: bool = True, tables: Sequence[str] = ()) -> None:
        """Refuse (StoreError) to `what` on a DB that is empty while the store holds data or that fails
        SQLite's quick_check (`full`: of the whole DB, else of `tables` only).  A passed check is
        remembered until another process commits (PRAGMA data_version), so a process pays for it once
        (writes check WRITE_CHECK_TABLES; gc, rmi and imports, which read or write refs, the whole DB)."""
        from flatmount.store.sqlite import sqlite3

        version = -1
        if self._db is not None or os.path.exists(self.db_file):
            try:
                version = self.connect().execute("PRAGMA data_version").fetchone()[0]
            except sqlite3.Error:
                version = -1
            cached = self._db_sound
            if cached is not None and cached[0] == version and (cached[1] or not full) and version >= 0:
                return
        problems = self.db_problems(tables=() if full else tables)
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise StoreError(f"store {self.root_str}: refusing to {what}: {problems[0]}{more}" + DB_ADVICE)
        if version >= 0:
            self._db_sound = (version, full or not tables)

    def _connect_writable(self, sqlite3):
        db = sqlite3.connect(self.db_file, isolation_level=None, check_same_thread=False,
                             timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            self._init_schema(db)
        except BaseException:
            db.close()
            raise
        return db

    def _connect_readonly(self, sqlite3):
        path = self.db_file
        if not os.path.exists(path):
            return _empty_db(sqlite3)
        from urllib.parse import quote

        uri = f"file:{quote(path)}?mode=ro"
        live_writer = os.path.exists(f"{path}-wal") and os.path.exists(f"{path}-shm")
        if not _dir_writable(self.root_str) or (self.is_additional and not live_writer):
            uri += "&immutable=1"
        db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False,
                             timeout=BUSY_TIMEOUT_MS / 1000)
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"store {self.root_str} has schema version {version}; this flatmount "
                             f"understands up to {SCHEMA_VERSION}")
        if version == 0:  # an empty or half-created DB: read it as empty
            db.close()
            db = _empty_db(sqlite3)
        return db

    def _init_schema(self, db) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise StoreError(f"store {self.root_str} has schema version {version}; this flatmount "
                             f"understands up to {SCHEMA_VERSION}")
        data = self.data_besides_db() if version == 0 else None
        if data:
            raise StoreError(f"store {self.root_str}: database {self.db_file} is empty but the store holds {data}: "
                             "refusing to write to it (its records would be lost and gc would delete every "
                             "object); restore flatmount.db from a backup (nothing was changed)")
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                version = 1
            for v in range(version + 1, SCHEMA_VERSION + 1):
                for step in MIGRATIONS[v]:
                    if callable(step):
                        step(db)
                    else:
                        db.execute(step)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def transaction(self, durable: bool = True, clean: bool = True) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT on the primary (ROLLBACK if the block raises).

        `durable=False` for rows that only cache what can be derived again (a flattened image's
        record) or that a power loss makes moot anyway (a mount's lease: every mount is gone after
        it, and a lease from another boot is stale): the commit skips the WAL fsync
        (synchronous=NORMAL); a power loss may forget the row, never corrupt the DB, and the next
        durable commit of any process makes it durable.  `clean`: see `ensure_writable`."""
        from flatmount.store.sqlite import sqlite3

        self.ensure_writable(clean=clean)
        db = self.connect()
        if db.in_transaction:
            raise StoreError("nested store transaction")
        self.require_sound_db("write to it", full=False, tables=WRITE_CHECK_TABLES)
        if not durable:
            db.execute("PRAGMA synchronous=NORMAL")
        try:
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                raise StoreError(f"store {self.root_str} is busy: {e}") from None
            try:
                yield db
            except sqlite3.DatabaseError as e:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                if _is_corruption(e):
                    raise StoreError(f"store {self.root_str}: database error: {e}" + DB_ADVICE) from None
                raise
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            try:
                db.execute("COMMIT")
            except sqlite3.Error as e:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise StoreError(f"cannot commit to store {self.root_str}: {e}") from None
        finally:
            if not durable:
                db.execute("PRAGMA synchronous=FULL")

    def close(self) -> None:
        """Close the DB connection and object store handles (of the additional stores too), once this
        process's derived-file writers (flatmount.store.paths.DERIVED) are done."""
        from flatmount.store.paths import wait_derived

        wait_derived()
        for s in (self, *self.additional):
            if s._db is not None:
                db = s._db
                s._forget_db()
                db.close()
            if s._objects is not None:
                s._objects.close()
                s._objects = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Rows of a read query; a primary store that was never written reads as empty."""
        from flatmount.store.sqlite import sqlite3

        if not self.readonly and not os.path.exists(self.db_file):
            return []
        try:
            return self.connect().execute(sql, params).fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"cannot read the database of store {self.root_str}: {e}") from None

    # --- locks ------------------------------------------------------------------------------------
    def gc_lock(self, shared: bool, clean: bool = True) -> contextlib.AbstractContextManager[None]:
        """flock on <root>/gc.lock: writers hold it shared from first object put to commit, gc
        exclusive (flatmount.store.locks.gc_lock)."""
        from flatmount.store.locks import gc_lock

        return gc_lock(self, shared, clean)

    def _try_exclusive_gc(self) -> contextlib.AbstractContextManager[bool]:
        """The exclusive GC lock if free right now (True), without waiting; else False."""
        from flatmount.store.locks import try_exclusive

        return try_exclusive(self)

    # --- layers -----------------------------------------------------------------------------------
    def _layer_cols(self) -> str:
        """The layer columns to SELECT (image_digest as NULL from a DB of schema 1, e.g. an older
        additional store)."""
        cols = "id, parent, diff_id, compressed_digest, compressed_size, diff_size, created, inodes"
        if not self.readonly and not os.path.exists(self.db_file):
            return cols + ", NULL"   # (nothing to read: `_rows` gives no rows)
        db = self.connect()
        has = self._has_image_digest
        if has is None or has[0] is not db:
            try:
                names = {r[1] for r in db.execute("PRAGMA table_info(layers)")}
            except Exception:  # noqa: BLE001 - a damaged DB: `_rows` reports it
                names = set()
            has = self._has_image_digest = (db, "image_digest" in names)
        return cols + (", image_digest" if has[1] else ", NULL")

    def _layer_record(self, row: tuple) -> LayerRecord:
        return LayerRecord(row[0], row[1], row[2], row[3], row[4], row[5], row[6], self.root_str,
                           self.layer_image_path(row[0]), row[7], row[8])

    def own_layer(self, layer_id: str) -> LayerRecord | None:
        """The layer if THIS store (not its additional stores) records it."""
        rows = self._rows(f"SELECT {self._layer_cols()} FROM layers WHERE id = ?", (layer_id,))
        return self._layer_record(rows[0]) if rows else None

    def has_layer(self, layer_id: str) -> bool:
        return any(s.own_layer(layer_id) is not None for s in (self, *self.additional))

    def layer(self, layer_id: str) -> LayerRecord:
        """The layer record, primary first, then each additional store (NotFoundError if none)."""
        lid = layer_id.removeprefix("sha256:")
        for s in (self, *self.additional):
            rec = s.own_layer(lid)
            if rec is not None:
                return rec
        raise NotFoundError(f"layer {layer_id!r} is in none of the stores ({self._store_list()})")

    def layers(self) -> list[LayerRecord]:
        """Every layer, primary first (an id recorded in several stores is listed once)."""
        out: list[LayerRecord] = []
        seen: set[str] = set()
        for s in (self, *self.additional):
            for row in s._rows(f"SELECT {s._layer_cols()} FROM layers ORDER BY rowid"):
                if row[0] not in seen:
                    seen.add(row[0])
                    out.append(s._layer_record(row))
        return out

    def layer_chain(self, top_id: str) -> list[LayerRecord]:
        """The layers from the base up to `top_id` (base first); the chain may cross stores."""
        chain: list[LayerRecord] = []
        seen: set[str] = set()
        lid: str | None = top_id
        while lid is not None:
            if lid in seen:
                raise StoreError(f"layer chain of {top_id} has a cycle at {lid}")
            seen.add(lid)
            rec = self.layer(lid)
            chain.append(rec)
            lid = rec.parent
        chain.reverse()
        return chain

    # --- images -----------------------------------------------------------------------------------
    def _name_map(self) -> dict[str, tuple[str, Store]]:
        """name -> (image id, store recording the name); primary names shadow additional ones."""
        names: dict[str, tuple[str, Store]] = {}
        for s in (self, *self.additional):
            for name, image_id in s._rows("SELECT name, image_id FROM names"):
                names.setdefault(name, (image_id, s))
        return names

    def _image_rows(self) -> dict[str, tuple[tuple, Store]]:
        """image id -> (row, store); the first store holding an id wins."""
        out: dict[str, tuple[tuple, Store]] = {}
        for s in (self, *self.additional):
            for row in s._rows("SELECT id, top_layer, config, created FROM images ORDER BY rowid"):
                out.setdefault(row[0], (row, s))
        return out

    @staticmethod
    def _image_record(row: tuple, store: Store, names: Sequence[str]) -> ImageRecord:
        config = None
        if row[2] is not None:
            import json  # here, not at the top: most commands read no image config (start-up)

            try:
                config = json.loads(row[2])
            except (ValueError, UnicodeDecodeError):
                config = None
            if not isinstance(config, dict):
                config = None
        return ImageRecord(row[0], tuple(sorted(names)), row[1], row[3], store.root_str, config)

    def images(self) -> list[ImageRecord]:
        """Every image (primary first, an id recorded in several stores listed once) with its names."""
        rows = self._image_rows()
        by_id: dict[str, list[str]] = {}
        for name, (image_id, _s) in self._name_map().items():
            by_id.setdefault(image_id, []).append(name)
        return [self._image_record(row, s, by_id.get(iid, ())) for iid, (row, s) in rows.items()]

    def image(self, image_id: str) -> ImageRecord | None:
        for rec in self.images():
            if rec.id == image_id:
                return rec
        return None

    def resolve_image(self, ref: str) -> ImageRecord:
        """The image `ref` means: full id, then name, then unique id prefix (>= 3 hex digits)."""
        rows = self._image_rows()
        names = self._name_map()
        image_id = self._resolve_id(ref.strip(), rows, names)
        row, s = rows[image_id]
        return self._image_record(row, s, [name for name, (iid, _s) in names.items() if iid == image_id])

    def resolve_top_layer(self, ref: str) -> tuple[str, str | None]:
        """(id, top layer id) of the image `ref` means, as `resolve_image` finds it, without parsing
        its config (a mount needs only the chain: every millisecond of CLI start-up counts)."""
        rows = self._image_rows()
        image_id = self._resolve_id(ref.strip(), rows, self._name_map())
        return image_id, rows[image_id][0][1]

    def _resolve_id(self, ref: str, rows: dict[str, tuple[tuple, Store]],
                    names: dict[str, tuple[str, Store]]) -> str:
        """THE lookup order of `resolve_image` (NotFoundError when nothing matches)."""
        hexref = ref.removeprefix("sha256:")
        if is_hex(hexref, 64) and hexref in rows:
            return hexref
        if ref:
            for cand in name_candidates(ref):
                hit = names.get(cand)
                if hit is not None and hit[0] in rows:
                    return hit[0]
        if is_hex(hexref, 3, 64):
            matches = sorted(i for i in rows if i.startswith(hexref))
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise NotFoundError(f"image id prefix {ref!r} is ambiguous: "
                                    + ", ".join(m[:12] for m in matches))
        raise NotFoundError(f"image {ref!r} not found in {self._store_list()}")

    def _store_list(self) -> str:
        return ", ".join(s.root_str for s in (self, *self.additional))

    # --- image edits (primary only) ---------------------------------------------------------------
    def tag(self, ref: str, name: str) -> ImageRecord:
        """Give image `ref` the name `name` (normalised); the name moves if another image had it.

        The name must follow the reference grammar podman uses (flatmount.reference)."""
        image = self.resolve_image(ref)
        full = normalise_name(name)
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO names(name, image_id) VALUES (?, ?)", (full, image.id))
        return self.resolve_image(image.id)

    def remove_image(self, ref: str, *, refuse_several_names: bool = False) -> RemovedImage:
        """`rmi`: by name, untag that name (the image goes when its last name goes); by id, remove it.

        `refuse_several_names` (what `flatmount rmi` asks for without --force, as `podman rmi`):
        by id, an image with several names is refused, so an id typed for one name never takes the
        others with it.

        Removing an image also removes (records, then files) the primary-store layers of its chain that
        no remaining image's chain uses.  Objects are left to `gc`.  Images and layers of additional
        stores cannot be removed (ReadOnlyStoreError); names in the primary pointing at them can.
        """
        self.require_sound_db("remove images")
        image = self.resolve_image(ref)
        names = self._name_map()
        by_name = ref.strip() not in (image.id, "sha256:" + image.id) and any(
            c in names and names[c][0] == image.id for c in name_candidates(ref.strip()))
        untag: list[str] = []
        if by_name:
            cand = next(c for c in name_candidates(ref.strip()) if c in names and names[c][0] == image.id)
            if names[cand][1] is not self:
                raise ReadOnlyStoreError(f"name {cand!r} is recorded in additional store "
                                         f"{names[cand][1].root}: it cannot be removed")
            untag = [cand]
            remaining = [n for n in image.names if n != cand]
            delete = not remaining
        else:
            if len(image.names) > 1 and refuse_several_names:
                raise StoreError(f"image {image.id[:12]} has {len(image.names)} names "
                                 f"({', '.join(image.names)}): remove them one by one (`rmi NAME`), or "
                                 "force the removal of the image with all its names (`rmi --force`)")
            untag = [n for n in image.names if names[n][1] is self]
            delete = True
        removed_layers: list[str] = []
        if delete and image.store_root != self.root_str:
            if by_name:
                delete = False  # untagging a name of an additional-store image is fine
            else:
                raise ReadOnlyStoreError(f"image {image.id[:12]} is in additional store {image.store_root}: "
                                         "it cannot be removed")
        with self.transaction() as db:
            for n in untag:
                db.execute("DELETE FROM names WHERE name = ?", (n,))
            if delete:
                db.execute("DELETE FROM names WHERE image_id = ?", (image.id,))
                db.execute("DELETE FROM images WHERE id = ?", (image.id,))
                removed_layers = self._unused_layers(db, image.top_layer)
                for lid in removed_layers:
                    db.execute("DELETE FROM layers WHERE id = ?", (lid,))
                    reftable.delete_owner(db, "layer:" + lid)
        from flatmount.store.paths import layer_cache_path

        for lid in removed_layers:  # records first, files after: never a record without its file
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.layer_image_path(lid))
            with contextlib.suppress(FileNotFoundError):  # its tree cache
                os.unlink(layer_cache_path(self.layer_image_path(lid)))
        return RemovedImage(ref, image.id, tuple(untag), delete, tuple(removed_layers))

    def _unused_layers(self, db, top: str | None) -> list[str]:
        """Primary layers of the chain below `top` that no other image and no other layer uses."""
        used: set[str] = set()
        for (t,) in db.execute("SELECT top_layer FROM images WHERE top_layer IS NOT NULL"):
            lid = t
            while lid is not None and lid not in used:
                used.add(lid)
                row = db.execute("SELECT parent FROM layers WHERE id = ?", (lid,)).fetchone()
                if row is None:
                    break
                lid = row[0]
        removed: list[str] = []
        lid = top
        while lid is not None and lid not in used:
            row = db.execute("SELECT parent FROM layers WHERE id = ?", (lid,)).fetchone()
            if row is None:  # in an additional store: below it nothing is ours
                break
            children = [c for (c,) in db.execute("SELECT id FROM layers WHERE parent = ?", (lid,))
                        if c not in removed]
            if children:
                break
            removed.append(lid)
            lid = row[0]
        return removed


# --- helpers ---------------------------------------------------------------------------------------

def _empty_db(sqlite3):
    """An in-memory DB with the current schema: what a store without records reads as."""
    db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    db.executescript(SCHEMA)
    for stmt in MIGRATIONS[2]:
        db.execute(stmt)
    return db


def _db_empty(path: str) -> bool:
    try:
        return os.stat(path).st_size == 0
    except FileNotFoundError:
        return True


def _is_corruption(e: BaseException) -> bool:
    text = str(e)
    return "malformed" in text or "not a database" in text or "corrupt" in text


def _mkdir(path: str, mode: int, parents: bool = False) -> None:
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parents and not os.path.isdir(parent):
        os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return
    os.chmod(path, mode)  # whatever the umask


def _dir_writable(path: str) -> bool:
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return False
    except OSError:
        return False
    return os.access(path, os.W_OK)


def _is_object_store_error(e: BaseException) -> bool:
    from objects.errors import ObjectStoreError

    return isinstance(e, ObjectStoreError)


def _remove_stale(dir_fd: int, name: str, cutoff: float | None) -> bool:
    """Remove tmp/ entry `name` (of directory fd `dir_fd`) unless a live writer holds an flock on it or
    (with a cutoff) it is recent; through the directory fd, never following a symlink."""
    from flatmount.safepath import remove_tree_at
    from flatmount.store.locks import held_by_other

    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if cutoff is not None and st.st_mtime >= cutoff:
        return False
    is_dir = stat.S_ISDIR(st.st_mode)
    fd = -1
    if is_dir or stat.S_ISREG(st.st_mode):  # writers flock only these; never open a device or FIFO
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                         | (os.O_DIRECTORY if is_dir else 0), dir_fd=dir_fd)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOENT, errno.ENOTDIR):
                return False
    try:
        if fd >= 0:
            if held_by_other(fd):
                return False
        if is_dir:
            remove_tree_at(dir_fd, name)
        else:
            os.unlink(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False
    finally:
        if fd >= 0:
            os.close(fd)

