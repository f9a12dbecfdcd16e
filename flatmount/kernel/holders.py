"""Whether a lazily detached mount is still in use: the proof `umount --lazy` leases rest on.

`umount --lazy` detaches a busy overlay (MNT_DETACH): it leaves every mount table, but the kernel
keeps it, and so needs its objects, while a process holds a file, a cwd, a root or a mapping in it,
or while a bind mount of it lives in some mount namespace.  Its lease stays until none of these is
left; this module looks for them in /proc:

- every mount namespace's mountinfo, for a mount of the overlay's superblock (`MAJ:MIN`, file
  system type and source: the image);
- every process' open files, cwd, root and mapped files, for the overlay's unique mount id
  (statx STATX_MNT_ID_UNIQUE through the /proc magic links, never reused on a boot).

The answer is True (in use), False (proven unused) or None (cannot tell: no /proc, no unique mount
ids, a process we may not look into); only False lets the lease go.
"""

from __future__ import annotations

import os


def _sb_key(fields: list[bytes]) -> str | None:
    """`MAJ:MIN FSTYPE SOURCE` of a split mountinfo line: the superblock it mounts, as recorded."""
    try:
        sep = fields.index(b"-", 6)
        return b" ".join((fields[2], fields[sep + 1], fields[sep + 2])).decode(errors="surrogateescape")
    except (ValueError, IndexError):
        return None


def superblock_key(mountpoint: str) -> str | None:
    """`MAJ:MIN FSTYPE SOURCE` of the file system mounted at `mountpoint` (topmost), from our
    mountinfo: the superblock a bind mount of it shares.  The source (for flatmount, the image
    path) keeps an anonymous device number reused later by another mount from matching."""
    target = os.fsencode(os.path.realpath(mountpoint))
    found = None
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == target:
                    found = _sb_key(fields)
    except OSError:
        return None
    return found


def _unescape(field: bytes) -> bytes:
    """mountinfo's octal escapes (`\\040` for a space) undone."""
    if b"\\" not in field:
        return field
    import re

    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def _pids() -> list[str]:
    return [p for p in os.listdir("/proc") if p.isdigit()]


def _mounted_anywhere(sb: str, pids: list[str]) -> bool | None:
    """Whether any mount namespace (of any process) has a mount of superblock `sb`; None if none
    was found but some mount table could not be read."""
    seen: set[str] = set()
    unknown = False
    for pid in pids:
        try:
            key = os.readlink(f"/proc/{pid}/ns/mnt")
        except FileNotFoundError:
            continue                      # exited
        except OSError:
            key = None                    # read its mount table anyway
        if key is not None:
            if key in seen:
                continue
            seen.add(key)
        try:
            with open(f"/proc/{pid}/mountinfo", "rb") as f:
                if any(_sb_key(line.split()) == sb for line in f):
                    return True
        except (FileNotFoundError, ProcessLookupError):
            continue
        except OSError:
            unknown = True
    return None if unknown else False


def _held_by_process(mnt_id: int, pids: list[str]) -> bool | None:
    """Whether any process has an fd, cwd, root or mapped file on the mount with unique id `mnt_id`;
    None if some process cannot be looked into (e.g. one we may not ptrace-read)."""
    from flatmount.kernel.kmount import mount_id

    if mount_id("/proc/self") is None:   # no STATX_MNT_ID_UNIQUE here: cannot tell
        return None
    unknown = False
    for pid in pids:
        base = f"/proc/{pid}"
        links = [f"{base}/cwd", f"{base}/root"]
        for sub in ("fd", "map_files"):
            try:
                links += [f"{base}/{sub}/{name}" for name in os.listdir(f"{base}/{sub}")]
            except (FileNotFoundError, ProcessLookupError):
                break                     # the process exited meanwhile
            except OSError:
                unknown = True
        for link in links:
            try:
                os.stat(link)             # follows the magic link, as statx below does
            except (FileNotFoundError, ProcessLookupError):
                continue                  # closed or exited meanwhile: holds nothing
            except OSError:
                unknown = True
                continue
            if mount_id(link) == mnt_id:
                return True
    return None if unknown else False


def detached_mount_in_use(mnt_id: int | None, sb: str) -> bool | None:
    """True while the detached mount (unique id `mnt_id`, superblock `sb` as `superblock_key`
    gave it) is in use, False once proven unused, None when it cannot be told (module doc)."""
    try:
        pids = _pids()
    except OSError:
        return None
    mounted = _mounted_anywhere(sb, pids)
    if mounted:
        return True
    held = _held_by_process(mnt_id, pids) if mnt_id is not None else None
    if held:
        return True
    return None if mounted is None or held is None else False


def overlays_over(path: str) -> list[str]:
    """Mount points (in our mountinfo) of overlays that have `path` as a layer: a bundle's stubs
    overlay over its merged dir, which keeps that mount in use although it shows no mount of it."""
    target = os.path.realpath(path)
    found = []
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split()
                try:
                    sep = fields.index(b"-", 6)
                except ValueError:
                    continue
                if fields[sep + 1:sep + 2] != [b"overlay"] or len(fields) <= sep + 3:
                    continue
                for opt in fields[sep + 3].decode(errors="surrogateescape").split(","):
                    key, _, val = opt.partition("=")
                    if key in ("lowerdir", "upperdir", "lowerdir+") and target in val.split(":"):
                        found.append(os.fsdecode(_unescape(fields[4])))
    except OSError:
        return []
    return found


def other_namespace_user(mountpoints: list[str]) -> tuple[str, str] | None:
    """`(pid, mount namespace)` of a process in a mount namespace other than ours whose mount table
    shows the superblock of one of `mountpoints` (e.g. a container runc made of a bundle, which
    keeps reading it after we unmount our copy), or None if no other namespace shows one."""
    sbs = {sb for sb in (superblock_key(m) for m in mountpoints) if sb}
    if not sbs:
        return None
    try:
        ours = os.readlink("/proc/self/ns/mnt")
        pids = _pids()
    except OSError:
        return None
    seen = {ours}
    for pid in pids:
        try:
            ns = os.readlink(f"/proc/{pid}/ns/mnt")
        except OSError:
            continue                      # exited, or a kernel thread
        if ns in seen:
            continue
        seen.add(ns)
        try:
            with open(f"/proc/{pid}/mountinfo", "rb") as f:
                if any(_sb_key(line.split()) in sbs for line in f):
                    return pid, ns
        except OSError:
            continue
    return None
