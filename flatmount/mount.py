"""Mount an image's flattened EROFS image read-only at a merged dir private to that mount, with a lease.

Every mount gets a fresh `<runroot>/mounts/<id>/merged` (parents 0700), so no two processes ever share
a mountpoint and one can never unmount another's view (the c/storage race this project removes).
A lease row (id, image digest, ref, merged path, pid, boot id, mount namespace) in the primary store's
DB names each mount and pins its image's objects against GC.

Mount namespaces.  A mount made in another mount namespace (`unshare -m flatmount mount x`) is not
visible from here, so a lease records its namespace (`mnt_ns`, flatmount.kernel.mntns) and is judged in
it: live while that namespace exists and has the merged dir mounted.  Leases written before this
column existed (NULL) are judged in the caller's namespace, as before.  The column is added to an
older DB on the first mount (ALTER TABLE ... ADD COLUMN: older flatmount versions, which name their
columns, keep working on it).

Crash safety.  Every state change of a mount happens while its process holds an flock on the
`<id>` directory, in this order:
    mount:   mkdir <id>, lock, mkdir merged, INSERT lease, mount
    unmount: lock, umount, DELETE lease, rmdir merged, rmdir <id>
A process killed anywhere leaves one of: empty dirs without a lease, a lease without a mount (both
repaired by `cleanup`), or a complete mount with its lease (left alone).  `cleanup` only touches a
directory whose lock it can take, so it never races a mount or unmount in progress; the kernel drops
a dead process' flock.  A mount without a lease cannot arise; `cleanup` still unmounts one it finds
under `<runroot>/mounts` (nothing pins its objects), and nothing a live lease names.

Locks: while mounting, the primary's GC lock is held shared from the flat-image lookup to the lease
commit (so GC sees either no image use or the lease); while mounted, no lock is held on any store, and
additional stores are never locked or written at all.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time

from flatmount.errors import (
    MountError,
    NotFoundError,
    PermissionRequiredError,
    ReadOnlyStoreError,
    StoreError,
)
from flatmount.record import record, replace
from flatmount.store.leases import LEASE_COLS, Lease, judge_lease, lease_rows, lease_stale_reason
from flatmount.store.locks import lock_dir
from objects.writemode import boot_id  # leases from another boot are stale (also for gc, bundle)

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: CLI start-up, see objects/lazy.py)

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Iterator

    from flatmount.flatten import FlatImage
    from flatmount.store.core import Store

DIR_MODE = 0o700
CAP_SYS_ADMIN = 21


@record
class CleanupResult:
    """What `cleanup` repaired; `busy` are mount dirs another process is mounting or unmounting now."""

    removed_leases: tuple[str, ...]
    removed_dirs: tuple[str, ...]
    unmounted: tuple[str, ...]
    kept: tuple[str, ...]
    busy: tuple[str, ...]


# --- helpers --------------------------------------------------------------------------------------

def mounts_dir(store: Store) -> str:
    return os.path.join(store.runroot_str, "mounts")


def _require_mount_privilege() -> None:
    """Refuse early (before any lease is written) when we cannot mount at all."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    if int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1:
                        return
                    break
    except OSError:
        if os.geteuid() == 0:
            return
    raise PermissionRequiredError("mounting needs root (CAP_SYS_ADMIN): run flatmount as root")


def _require_writable(store: Store) -> None:
    if store.readonly:
        raise ReadOnlyStoreError(f"store {store.root_str} is opened read-only: mounts need a writable primary "
                                 "store for their leases")


def _mkdir_private(path: str) -> None:
    """mkdir -p with every created component 0700 (whatever the umask); a runroot another user could
    redirect, or a `path` that is a symlink, is refused (flatmount.safepath)."""
    from flatmount.safepath import make_private_subdir

    make_private_subdir(path, "runroot")


def _rmdir(path: str, removed: list[str] | None = None) -> bool:
    """rmdir (never a recursive delete); True if it is gone."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EBUSY, errno.ENOTDIR):
            return False
        raise
    if removed is not None:
        removed.append(path)
    return True


def _ensure_ns_column(db) -> None:
    """Add `leases.mnt_ns`, `mnt_id` to a DB created before they existed (in the caller's transaction)."""
    have = {r[1] for r in db.execute("PRAGMA table_info(leases)")}
    for col, kind in (("mnt_ns", "TEXT"), ("mnt_id", "INTEGER"), ("detached_sb", "TEXT")):
        if col not in have:
            db.execute(f"ALTER TABLE leases ADD COLUMN {col} {kind}")


def _leases(store: Store, where: str = "", params: tuple = ()) -> list[Lease]:
    if not os.path.exists(store.db_file):
        return []
    return lease_rows(store.connect(), where, params)


# Lease rows are written without an fsync and without the store's first-write cleaning of tmp/
# (Store.transaction): a lease describes a kernel mount, and no mount outlives a power loss, after
# which every lease is from another boot and so stale; a process killed after its commit loses
# nothing (the WAL frame is in the page cache).  GC, in whatever process, reads committed rows, so
# the pin holds as soon as the INSERT commits.  This keeps an fsync (5-30 ms on a busy disk) and the
# object store's code off `mount` and `umount`.
_LEASE_WRITE = {"durable": False, "clean": False}


def _delete_lease(store: Store, lease_id: str) -> None:
    with store.transaction(**_LEASE_WRITE) as db:
        db.execute("DELETE FROM leases WHERE id = ?", (lease_id,))


def involved_object_dirs(store: Store, chain, image_path: str) -> list[str]:
    """Object dirs backing an image: the primary's, then those of the additional stores holding a
    layer of the chain or the image itself (in config order).  A missing one is an error."""
    need = {layer.store_root for layer in chain}
    need.add(os.path.dirname(os.path.dirname(os.path.abspath(image_path))))
    out = []
    for s, d in zip((store, *store.additional), store.object_dirs(), strict=True):
        if s is not store and s.root_str not in need:
            continue
        if not os.path.isdir(d):
            if s is store and s.root_str not in need:
                continue
            raise StoreError(f"object directory {d} of store {s.root_str} is missing: the image's files "
                             "live there (store damaged? run fsck)")
        out.append(d)
    return out


# --- mounting -------------------------------------------------------------------------------------

def mount_image_ref(store: Store, ref: str) -> Lease:
    """Mount image `ref` (name, id or id prefix) at a new private merged dir; the lease describes it.

    The caller owns the mount: `umount(store, lease.id)` (or `mount()` as a context manager)."""
    from flatmount.flatten import chain_of, flatten_chain
    from flatmount.kernel.kmount import mount_image
    from flatmount.store.integrity import verify_flat_image

    _require_writable(store)
    _require_mount_privilege()
    chain = chain_of(store, ref)
    with store.gc_lock(shared=True, clean=False):   # tmp/ is cleaned by flatten if it writes (_LEASE_WRITE)
        flat = flatten_chain(store, chain)
        verify_flat_image(store, flat.path, flat.digest)   # unless verified since last written
        dirs = involved_object_dirs(store, chain, flat.path)
        lease, fd = _create_lease(store, ref, flat)
    try:
        try:
            mount_image(flat.path, lease.merged, dirs, verity=_verity_ready(store, flat, dirs))
        except BaseException:
            _delete_lease(store, lease.id)
            _rmdir(lease.merged)
            _rmdir(os.path.dirname(lease.merged))
            raise
        lease = _record_mount_id(store, lease)
    finally:
        os.close(fd)
    return lease


def verity_required(object_states: list[str | None], image_verity: bool) -> bool:
    """Whether a mount can ask overlayfs for `verity=require`: only when every object dir records
    that all its objects have fs-verity (objects.verity "all") and the image has it too; with one
    object without it, `require` would make that file unreadable (EIO)."""
    return image_verity and bool(object_states) and all(s == "all" for s in object_states)


def _verity_ready(store: Store, flat: FlatImage, dirs: list[str]) -> bool:
    """`verity_required` for this mount: reads the dirs' records, and gives the primary store's image
    fs-verity (then checks its now immutable bytes against its sha256 name).  False, quietly,
    wherever fs-verity is unavailable (this is the path every mount takes on such kernels)."""
    from flatmount.store.paths import flat_image_path
    from objects import verity
    from objects.errors import ObjectStoreError

    if not verity_required([verity.read_state(d) for d in dirs], True):
        return False
    try:
        fd = os.open(flat.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        digest = verity.measure(fd)
        if digest is None and not store.readonly and flat.path == flat_image_path(store.root_str, flat.digest):
            try:
                verity.enable(fd)
            except ObjectStoreError:
                return False
            digest = verity.measure(fd)
        if digest is None:
            return False
        from objects.sha256 import sha256

        h = sha256()
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
        if h.hexdigest() != flat.digest:
            from flatmount.errors import CorruptImageError

            raise CorruptImageError(f"flattened image {flat.path} does not match its name (sha256 "
                                    f"{h.hexdigest()}): remove it and flatten again (flatmount fsck)")
        return verity_required([verity.read_state(d) for d in dirs], True)
    finally:
        os.close(fd)


def _record_mount_id(store: Store, lease: Lease) -> Lease:
    """Note the overlay's unique mount id in the lease (lets another namespace ask the kernel about
    it exactly).  Not durable: a power loss changes the boot id, which makes the lease stale anyway;
    a lease without it is judged from /proc."""
    from flatmount.kernel.kmount import mount_id
    from flatmount.store.sqlite import sqlite3

    mid = mount_id(lease.merged)
    if mid is None:
        return lease
    try:
        with store.transaction(**_LEASE_WRITE) as db:
            db.execute("UPDATE leases SET mnt_id = ? WHERE id = ?", (mid, lease.id))
    except (StoreError, sqlite3.Error):
        return lease   # the mount is made and leased: failing it now would leave it to cleanup
    return replace(lease, mnt_id=mid)


def _create_lease(store: Store, ref: str, flat: FlatImage) -> tuple[Lease, int]:
    """Fresh `<runroot>/mounts/<id>/merged`, locked, with its lease committed: (lease, lock fd)."""
    from flatmount.kernel.mntns import current_ns

    base = mounts_dir(store)
    _mkdir_private(base)
    for _ in range(16):
        lease_id = os.urandom(8).hex()
        top = os.path.join(base, lease_id)
        try:
            os.mkdir(top, DIR_MODE)
        except FileExistsError:
            continue
        fd = lock_dir(top)
        if fd is None:  # a concurrent cleanup took it for a leftover: pick another id
            continue
        try:
            os.chmod(top, DIR_MODE)
            merged = os.path.join(top, "merged")
            os.mkdir(merged, DIR_MODE)
            lease = Lease(lease_id, flat.digest, ref, merged, os.getpid(), boot_id(), time.time(),
                          current_ns())
            with store.transaction(**_LEASE_WRITE) as db:
                _ensure_ns_column(db)
                db.execute(f"INSERT INTO leases({LEASE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (lease.id, lease.image_digest, lease.image_ref, lease.merged, lease.pid,
                            lease.boot_id, lease.created, lease.mnt_ns, None, None))
        except BaseException:
            _rmdir(os.path.join(top, "merged"))
            _rmdir(top)
            os.close(fd)
            raise
        return lease, fd
    raise StoreError(f"cannot create a mount directory under {base}")


@contextlib.contextmanager
def mount(store: Store, ref: str) -> Iterator[str]:
    """`with mount(store, "alpine") as merged:` the image read-only at a private dir, unmounted after."""
    lease = mount_image_ref(store, ref)
    try:
        yield lease.merged
    finally:
        umount(store, lease.id)


def find_lease(store: Store, merged_or_lease_id: str) -> Lease:
    """The lease named by its id, its merged dir or that dir's parent (NotFoundError if none)."""
    key = os.fspath(merged_or_lease_id)
    hits = _leases(store, "WHERE id = ?", (key,))
    if not hits:
        path = os.path.abspath(key)
        hits = _leases(store, "WHERE merged = ? OR merged = ?", (path, os.path.join(path, "merged")))
    if not hits:
        raise NotFoundError(f"no mount {merged_or_lease_id!r} (see `flatmount mounts`)")
    return hits[0]


def umount(store: Store, merged_or_lease_id: str, *, lazy: bool = False,
           container_done: bool = False, force: bool = False, detach_via: str | None = None) -> Lease:
    """Unmount a mount made by `mount_image_ref`, drop its lease, remove its two dirs (rmdir only).

    A busy mount (files open, a cwd inside) raises MountError and stays mounted with its lease, unless
    `lazy`: then it is detached now (MNT_DETACH) and the kernel frees it when its last user goes.
    Its lease stays, marked detached, and pins its objects until nothing uses the mount any more
    (flatmount.kernel.holders); `cleanup` drops it after that.  The root of a live container of `run` is
    refused (the container reads it through its own copy, which the lease must keep pinned), unless
    `container_done`: the container's own release.  A mount that another mount namespace still
    shows (a container runc made of a bundle) is refused too, unless `force`: then it is detached
    and its lease kept as with `lazy` (`held_elsewhere`); `detach_via`: the mount `held_elsewhere`
    found, which a caller that checked already (a bundle's removal) has this do."""
    from flatmount.kernel.kmount import is_mountpoint, umount_image

    _require_writable(store)
    lease = find_lease(store, merged_or_lease_id)
    top = os.path.dirname(lease.merged)
    fd = lock_dir(top)
    try:
        current = _leases(store, "WHERE id = ?", (lease.id,))
        if not current:
            raise NotFoundError(f"mount {lease.id} was unmounted meanwhile")
        _refuse_foreign_namespace(current[0])
        if not container_done:
            from flatmount.store.containers import container_holding

            cid = container_holding(lease.merged)
            if cid is not None:
                raise MountError(f"mount {lease.id} is the root of running container {cid}: "
                                 f"`flatmount stop {cid}` releases it", errno.EBUSY)
        if current[0].detached_sb is not None:
            raise MountError(f"mount {lease.id} was detached lazily and is still in use; its lease goes "
                             "with `flatmount cleanup` once nothing uses it", errno.EBUSY)
        if is_mountpoint(lease.merged):
            _require_mount_privilege()
            via = detach_via
            if via is None and not container_done:
                via = held_elsewhere(lease, force=force)
            if via is not None:
                lease = _detach_lazily(store, current[0], via)
                if fd is not None:
                    _rmdir(lease.merged)
                    _rmdir(top)
                return lease
            try:
                umount_image(lease.merged)
            except MountError as e:
                if not (lazy and e.errno == errno.EBUSY):
                    raise
                lease = _detach_lazily(store, current[0])
                if fd is not None:
                    _rmdir(lease.merged)
                    _rmdir(top)
                return lease
        _delete_lease(store, lease.id)
        if fd is not None:
            _rmdir(lease.merged)
            _rmdir(top)
    finally:
        if fd is not None:
            os.close(fd)
    return lease


def held_elsewhere(lease: Lease, *, force: bool, also: tuple[str, ...] = ()) -> str | None:
    """The mount (lease.merged, an overlay over it, or one of `also`) that a process in another mount
    namespace still shows (a container runc made of a bundle: unmounting our copy leaves its copy,
    which still reads the objects), or None.  Without `force` such a mount is refused (EBUSY)."""
    from flatmount.kernel.holders import other_namespace_user, overlays_over

    cands = [*also, *overlays_over(lease.merged), lease.merged]
    for m in cands:
        user = other_namespace_user([m])
        if user is None:
            continue
        if not force:
            pid, ns = user
            raise MountError(f"mount {lease.id} is still used by pid {pid} in another mount namespace "
                             f"({ns}): stop that container first, or use --force", errno.EBUSY)
        return m
    return None


def _detach_lazily(store: Store, lease: Lease, via: str | None = None) -> Lease:
    """Detach a busy mount and keep its lease, marked with the superblock it leaves in use: that
    of `via` if given (a mount over it that keeps it in use, detached too), else its own.

    The mark is committed before the detach: a crash in between leaves a mounted, marked lease,
    which is live (its superblock is still mounted) and is unmounted by `umount` as usual."""
    from flatmount.kernel.holders import superblock_key
    from flatmount.kernel.kmount import is_mountpoint, mount_id, umount_image

    held = via or lease.merged
    sb = superblock_key(held)
    if sb is None:
        raise MountError(f"cannot read the mount table entry of {held}: not detaching it",
                         errno.EBUSY)
    mid = mount_id(held) if via else (lease.mnt_id or mount_id(lease.merged))
    with store.transaction() as db:
        _ensure_ns_column(db)
        db.execute("UPDATE leases SET detached_sb = ?, mnt_id = ? WHERE id = ?", (sb, mid, lease.id))
    if via and via != lease.merged and is_mountpoint(via):
        umount_image(via, lazy=True)
    umount_image(lease.merged, lazy=True)
    return replace(lease, detached_sb=sb, mnt_id=mid)


def _refuse_foreign_namespace(lease: Lease) -> None:
    """A live mount of another mount namespace cannot be unmounted from here: removing its merged
    dir would even detach it there (the kernel lazily unmounts mount points of other namespaces on
    rmdir).  A stale one (namespace gone or mount gone from it) is dropped like any stale lease."""
    if lease.mnt_ns is None:
        return
    from flatmount.kernel.mntns import current_ns, ns_pids, ns_stale_reason

    if lease.mnt_ns == current_ns() or ns_stale_reason(lease.merged, lease.mnt_ns,
                                                       lease.mnt_id) is not None:
        return
    pids = ns_pids(lease.mnt_ns)
    how = (f"e.g. `nsenter --mount=/proc/{pids[0]}/ns/mnt flatmount umount {lease.merged}`" if pids
           else "from a process in that namespace")
    raise MountError(f"mount {lease.id} at {lease.merged} lives in another mount namespace "
                     f"(mnt {lease.mnt_ns.split('/')[0]}): unmount it there, {how}", errno.EBUSY)


def list_mounts(store: Store) -> list[Lease]:
    """Every lease of the primary store, oldest first, judged (`stale_reason` set on the stale ones,
    by the rule gc and fsck use; they stay listed until `cleanup`)."""
    boot = boot_id()
    return [judge_lease(lease, boot) for lease in _leases(store)]


def cleanup(store: Store) -> CleanupResult:
    """Remove stale leases (merged dir not mounted, or from another boot), leftover empty mount dirs,
    and mounts under `<runroot>/mounts` that no lease names.  Never unmounts a leased mount."""
    from flatmount.kernel.kmount import is_mountpoint, umount_image

    _require_writable(store)
    removed_leases: list[str] = []
    removed_dirs: list[str] = []
    unmounted: list[str] = []
    kept: list[str] = []
    busy: list[str] = []
    boot = boot_id()
    for lease in _leases(store):
        top = os.path.dirname(lease.merged)
        fd = lock_dir(top, wait=False)
        if fd is None and os.path.isdir(top):
            busy.append(top)
            continue
        try:
            if not _leases(store, "WHERE id = ?", (lease.id,)):
                continue  # unmounted by its owner just before we took the lock
            if lease_stale_reason(lease.merged, lease.boot_id, boot, locked=True,
                                  mnt_ns=lease.mnt_ns, mnt_id=lease.mnt_id,
                                  detached_sb=lease.detached_sb) is None:
                kept.append(lease.id)
                continue
            _delete_lease(store, lease.id)
            removed_leases.append(lease.id)
            if fd is not None:
                _rmdir(lease.merged, removed_dirs)
                _rmdir(top, removed_dirs)
        finally:
            if fd is not None:
                os.close(fd)
    base = mounts_dir(store)
    from flatmount.safepath import check_private_subdir

    try:
        names = sorted(os.listdir(base)) if check_private_subdir(base, "runroot") else []
    except FileNotFoundError:
        names = []
    for name in names:
        top = os.path.join(base, name)
        merged = os.path.join(top, "merged")
        if not os.path.isdir(top) or os.path.islink(top):
            continue
        fd = lock_dir(top, wait=False)
        if fd is None:
            if os.path.isdir(top):
                busy.append(top)
            continue
        try:
            if _leases(store, "WHERE merged = ?", (merged,)):
                continue  # leased (by a mount that finished after our first pass)
            if is_mountpoint(merged):
                _require_mount_privilege()
                umount_image(merged)
                unmounted.append(merged)
            _rmdir(merged, removed_dirs)
            _rmdir(top, removed_dirs)
        finally:
            os.close(fd)
    return CleanupResult(tuple(removed_leases), tuple(removed_dirs), tuple(unmounted), tuple(kept),
                         tuple(busy))
