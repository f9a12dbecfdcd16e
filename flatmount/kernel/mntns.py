"""Mount namespaces of leases: where a mount lives, and whether it is proven gone.

A mount made in another mount namespace (`unshare -m flatmount mount x`) is invisible from the host,
so "the merged dir is not a mount point here" proves nothing about it.  A lease therefore records
its mount namespace as `<nsfs inode>/<unique id>` (the id from NS_GET_MNTNS_ID, Linux 6.8+, which is
never reused during a boot, unlike inode numbers; just `<inode>` on older kernels), and a lease of
another namespace is judged by the kernel where it can tell, else from /proc:

- with the overlay's unique mount id recorded too (`mnt_id`, statx STATX_MNT_ID_UNIQUE), statmount(2)
  asked for that mount in that namespace by id (Linux 6.11+) answers exactly: found (live), or
  ENOENT (the namespace or the mount in it is gone: stale).  It holds however the namespace is kept
  alive (processes, open fds, bind-mounted nsfs files) and whether /proc is readable.  ENOENT is
  also what a caller without CAP_SYS_ADMIN over the namespace gets, so it is trusted only from a
  caller with CAP_SYS_ADMIN in the initial user namespace;
- otherwise, a process in that namespace whose root is the namespace's root (not chrooted) shows the
  namespace's whole mount table in /proc/PID/mountinfo: the merged dir is listed there, or the lease
  is stale ("not mounted in its mount namespace");
- no process in it, but an open fd (/proc/*/fd) or a bind-mounted nsfs file keeps it alive: its
  table cannot be read without entering it, so the lease counts as live;
- the namespace is found nowhere: stale ("its mount namespace no longer exists").
Whenever /proc cannot be read completely (permissions, hidepid), nothing is proven and the lease is
live: a lease is stale only when it is proven dead.
"""

from __future__ import annotations

import os

__all__ = ["current_ns", "ns_pids", "ns_stale_reason"]

# linux/nsfs.h: NS_GET_MNTNS_ID = _IOR(0xb7, 0x5, __u64)
NS_GET_MNTNS_ID = (2 << 30) | (8 << 16) | (0xB7 << 8) | 0x5

SYS_STATMOUNT = 457    # unified syscall table (see flatmount.kernel.kmount)
SYS_LISTMOUNT = 458
STATMOUNT_SB_BASIC = 0x1
LSMT_ROOT = (1 << 64) - 1
MNT_ID_REQ = "=IIQQQ"  # struct mnt_id_req VER1: size, spare, mnt_id, param, mnt_ns_id
CAP_SYS_ADMIN = 21

NOT_MOUNTED = "merged dir is not mounted in its mount namespace"
GONE = "its mount namespace no longer exists"


def _unique_id(fd: int) -> int | None:
    """The namespace's never-reused 64-bit id, or None where the kernel lacks the ioctl."""
    import fcntl
    import struct

    try:
        return struct.unpack("=Q", fcntl.ioctl(fd, NS_GET_MNTNS_ID, bytes(8)))[0]
    except OSError:
        return None


def ns_key(path: str) -> str | None:
    """`<inode>/<unique id>` (or `<inode>`) of the mount namespace file `path`; None if unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        ino = os.fstat(fd).st_ino
        uid = _unique_id(fd)
    finally:
        os.close(fd)
    return f"{ino}" if uid is None else f"{ino}/{uid}"


def current_ns() -> str | None:
    """The calling process' mount namespace, as recorded in a lease."""
    return ns_key("/proc/self/ns/mnt")


def _same(key: str, path: str) -> bool:
    """Whether namespace file `path` (whose inode already matched) is the namespace `key` names."""
    if "/" not in key:
        return True
    other = ns_key(path)
    if other is None:
        return True   # cannot tell: assume it is (never judge a live namespace dead)
    return other == key or "/" not in other


class _Scan:
    """One pass over /proc: processes in namespace `key`, and whether anything was unreadable."""

    def __init__(self, key: str):
        self.key = key
        self.ino = int(key.split("/", 1)[0])
        self.pids: list[int] = []
        self.unreadable = False
        self.other_ns_pids: dict[int, int] = {}   # nsfs inode -> one pid in that namespace
        for name in self._proc():
            if not name.isdigit():
                continue
            path = f"/proc/{name}/ns/mnt"
            try:
                ino = os.stat(path).st_ino
            except (FileNotFoundError, ProcessLookupError):
                continue
            except OSError:
                self.unreadable = True
                continue
            if ino == self.ino and _same(key, path):
                self.pids.append(int(name))
            else:
                self.other_ns_pids.setdefault(ino, int(name))

    def _proc(self) -> list[str]:
        try:
            return os.listdir("/proc")
        except OSError:   # no /proc here: nothing can be proven
            self.unreadable = True
            return []

    def held(self) -> bool:
        """Whether an open fd or a bind-mounted nsfs file (in any namespace we can see) keeps it."""
        link = f"mnt:[{self.ino}]"
        try:
            nsfs_dev = os.stat("/proc/self/ns/mnt").st_dev
        except OSError:
            self.unreadable = True
            return False
        for pid in [*self.other_ns_pids.values()]:
            try:
                with open(f"/proc/{pid}/mountinfo", "rb") as f:
                    for line in f:
                        fields = line.split(b" ")
                        if len(fields) > 4 and fields[3] == link.encode() and b" - nsfs " in line:
                            mp = os.fsdecode(fields[4])
                            if _same(self.key, f"/proc/{pid}/root{_unescape(mp)}"):
                                return True
            except (FileNotFoundError, ProcessLookupError):
                continue
            except OSError:
                self.unreadable = True
        for name in self._proc():
            if not name.isdigit():
                continue
            try:
                fds = os.listdir(f"/proc/{name}/fd")
            except (FileNotFoundError, ProcessLookupError):
                continue
            except OSError:
                self.unreadable = True
                continue
            for fd in fds:
                path = f"/proc/{name}/fd/{fd}"
                try:
                    target = os.readlink(path)
                    if target.startswith(("socket:[", "pipe:[", "anon_inode:")) or (
                            ":[" in target and not target.startswith("mnt:[")):
                        continue   # not a mount namespace (other namespaces read "net:[...]" etc.)
                    # an fd opened through a bind-mounted nsfs file reads as that file's path (or "/"
                    # once it is unmounted), so compare the inode it leads to, not the link text
                    st = os.stat(path)
                    if (st.st_dev, st.st_ino) == (nsfs_dev, self.ino) and _same(self.key, path):
                        return True
                except OSError:
                    continue
        return False


def _unescape(field: str) -> str:
    from flatmount.kernel.kmount import _unescape as unescape

    return unescape(field)


def _mounted_in(pid: int, merged: str, ino: int) -> bool | None:
    """Whether `merged` is a mount point in the mount table of `pid` (in namespace inode `ino`);
    None if that cannot be told (pid chrooted, gone, or not in that namespace any more)."""
    from flatmount.kernel.kmount import mounts

    try:
        if os.readlink(f"/proc/{pid}/root") != "/":
            return None   # chrooted: its mountinfo shows only what lies below its root
        table = mounts(f"/proc/{pid}/mountinfo")
        if os.stat(f"/proc/{pid}/ns/mnt").st_ino != ino:
            return None   # exited (pid reused) or moved (setns) while we read
    except OSError:
        return None
    targets = {merged, os.path.normpath(merged)}
    return any(m.mountpoint in targets for m in table)


def _trusted_for_foreign_namespaces() -> bool:
    """CAP_SYS_ADMIN in the initial user namespace: statmount's ENOENT then means "not there"."""
    try:
        with open("/proc/self/status") as f:
            cap = next((int(line.split()[1], 16) for line in f if line.startswith("CapEff:")), 0)
        with open("/proc/self/uid_map") as f:
            initial = f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return False
    return initial and bool(cap >> CAP_SYS_ADMIN & 1)


def _mnt_req(mnt_id: int, param: int, ns_id: int) -> bytes:
    import struct

    return struct.pack(MNT_ID_REQ, struct.calcsize(MNT_ID_REQ), 0, mnt_id, param, ns_id)


def mount_in_ns(mnt_id: int, ns_id: int) -> bool | None:
    """Whether mount `mnt_id` (unique id) exists in mount namespace `ns_id`, asked of the kernel;
    None when it cannot say (no statmount with namespace ids, or an untrusted ENOENT)."""
    from flatmount.kernel.kmount import _UNIFIED_SYSCALL_TABLE, _sys

    if not _UNIFIED_SYSCALL_TABLE or not _trusted_for_foreign_namespaces():
        return None
    buf = bytearray(512)
    try:
        _sys(SYS_STATMOUNT, _mnt_req(mnt_id, STATMOUNT_SB_BASIC, ns_id), buf, len(buf), 0)
    except OSError as e:
        if e.errno == 2:   # ENOENT: no such namespace, or no such mount in it
            return False
        return None        # ENOSYS, EINVAL (no mnt_ns_id before 6.11), E2BIG, ...
    return True


def ns_exists(ns_id: int) -> bool | None:
    """Whether mount namespace `ns_id` exists (listmount(2) by namespace id), None if unknown."""
    from flatmount.kernel.kmount import _UNIFIED_SYSCALL_TABLE, _sys

    if not _UNIFIED_SYSCALL_TABLE or not _trusted_for_foreign_namespaces():
        return None
    buf = bytearray(8)   # room for one u64 mount id
    try:
        _sys(SYS_LISTMOUNT, _mnt_req(LSMT_ROOT, 0, ns_id), buf, 1, 0)
    except OSError as e:
        return False if e.errno == 2 else None
    return True


def ns_pids(key: str) -> list[int]:
    """Processes whose mount namespace is `key` (a lease's `mnt_ns`)."""
    return _Scan(key).pids


def ns_stale_reason(merged: str, key: str, mnt_id: int | None = None) -> str | None:
    """Why the lease of a mount at `merged` made in namespace `key` (not ours) is stale, or None;
    `mnt_id`: the overlay's unique mount id, when the lease recorded it."""
    parts = key.split("/")
    if len(parts) == 2:
        ns_id = int(parts[1])
        if mnt_id:
            alive = mount_in_ns(mnt_id, ns_id)
            if alive:
                return None
            if alive is False:
                return NOT_MOUNTED if ns_exists(ns_id) else GONE
        elif ns_exists(ns_id) is False:   # a lease whose mount id was never recorded (killed)
            return GONE
    scan = _Scan(key)
    undecided = False
    for pid in scan.pids:
        seen = _mounted_in(pid, merged, scan.ino)
        if seen is None:
            undecided = True
            continue
        if seen:
            return None
        return NOT_MOUNTED   # one complete view of the namespace's table is enough
    if undecided or scan.unreadable or scan.held() or scan.unreadable:
        return None
    return GONE
