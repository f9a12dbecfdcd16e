"""Mount leases: the rows that pin an image's objects while it is mounted, and THE rule that says
whether one is still live.  Read by mount, gc, usage, fsck and bundles alike, so it lives at the store
level (flatmount.mount writes and removes the rows).

A lease is live while its mount dir is flock'ed (a mount or unmount in progress, flatmount.store.locks)
or while its merged dir is mounted on this boot in the mount namespace it was made in, or a live
container (flatmount.store.containers) still uses its copy of the mount.
"""

from __future__ import annotations

import os

from flatmount.record import record, replace
from flatmount.store.locks import dir_busy
from objects.writemode import boot_id  # leases from another boot are stale

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: CLI start-up, see objects/lazy.py)

if TYPE_CHECKING:  # pragma: no cover
    import sqlite3

LEASE_COLS = "id, image_digest, image_ref, merged, pid, boot_id, created, mnt_ns, mnt_id, detached_sb"


@record
class Lease:
    """One mount: `merged` is the directory to use; `id` names it for `umount`."""

    id: str
    image_digest: str
    image_ref: str | None
    merged: str
    pid: int | None
    boot_id: str | None
    created: float | None
    mnt_ns: str | None = None         # flatmount.kernel.mntns key of the namespace the mount lives in
    mnt_id: int | None = None         # the overlay's unique mount id, recorded once it is mounted
    detached_sb: str | None = None    # set by `umount --lazy`: the superblock it left in use (holders)
    stale_reason: str | None = None   # set by `judge_lease`; None = live (or not judged)

    @property
    def live(self) -> bool:
        return self.stale_reason is None


def lease_stale_reason(merged: str, lease_boot_id: str | None, boot: str | None = None, *,
                       locked: bool = False, mnt_ns: str | None = None,
                       mnt_id: int | None = None, detached_sb: str | None = None) -> str | None:
    """Why a lease is stale, or None if it is live: THE rule shared by `cleanup`, gc and fsck.

    A lease is live while its mount dir (the merged dir's parent) is flock'ed -- a mount or unmount
    holds that lock from before the lease is written until the kernel mount is made or gone -- or
    when it was recorded on this boot and its merged dir is mounted in the mount namespace `mnt_ns`
    it was made in (ours when None or equal; another one while it exists and is not proven to lack
    the mount, see flatmount.kernel.mntns).  `locked`: the caller holds the lock itself (cleanup), so the
    in-progress case does not apply.  `detached_sb`: the mount was detached lazily while busy
    (`umount --lazy`); it is live while anything still uses it (flatmount.kernel.holders).
    """
    from flatmount.kernel.kmount import is_mountpoint

    if not locked and dir_busy(os.path.dirname(os.path.abspath(merged))):
        return None
    boot = boot_id() if boot is None else boot
    if lease_boot_id and boot and lease_boot_id != boot:
        return "recorded on another boot"
    if detached_sb is not None:
        from flatmount.kernel.holders import detached_mount_in_use

        if detached_mount_in_use(mnt_id, detached_sb) is False:
            return "detached lazily and no longer in use"
        return None
    if mnt_ns is not None:
        from flatmount.kernel.mntns import current_ns, ns_stale_reason

        here = current_ns()
        if here is None:
            return None   # cannot tell which namespace we are in: nothing is proven
        if mnt_ns != here:
            reason = ns_stale_reason(merged, mnt_ns, mnt_id)
            return None if reason is not None and _container_holds(merged) else reason
    if is_mountpoint(merged):
        return None
    return None if _container_holds(merged) else "merged dir is not mounted"


def _container_holds(merged: str) -> bool:
    """A live container's copy of the mount (its own mount namespace) needs the lease too."""
    from flatmount.store.containers import container_holding

    return container_holding(merged) is not None


def judge_lease(lease: Lease, boot: str | None = None) -> Lease:
    """`lease` with its `stale_reason` filled in."""
    return replace(lease, stale_reason=lease_stale_reason(lease.merged, lease.boot_id, boot,
                                                                      mnt_ns=lease.mnt_ns,
                                                                      mnt_id=lease.mnt_id,
                                                                      detached_sb=lease.detached_sb))


_LEASE_FIELDS = frozenset(LEASE_COLS.split(", "))


def lease_rows(db, where: str = "", params: tuple = ()) -> list[Lease]:
    """Leases of a store's DB (unjudged), oldest first; reads DBs with and without `mnt_ns`."""
    cur = db.execute(f"SELECT * FROM leases {where} ORDER BY created, id", params)
    names = [d[0] for d in cur.description]
    return [Lease(**{k: v for k, v in zip(names, row, strict=True) if k in _LEASE_FIELDS}) for row in cur.fetchall()]



def read_leases(db: sqlite3.Connection, boot: str | None = None) -> list[Lease]:
    """Every lease of a store's DB with its live/stale state."""
    boot = boot if boot is not None else boot_id()
    return [judge_lease(lease, boot) for lease in lease_rows(db)]
