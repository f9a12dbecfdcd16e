"""The records of bundles and containers (`flatmount-bundle.json`), as far as the store needs them:
whether a live container still uses a leased mount (flatmount.store.leases).  flatmount.run writes
these records; reading them lives here so that mount and gc never import flatmount.run.
"""

from __future__ import annotations

import os

from flatmount.safepath import read_file_below

RECORD = "flatmount-bundle.json"


def pid_start(pid: int) -> int | None:
    """Start time (clock ticks since boot) of process `pid`: with the pid, it names one process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def owner_alive(pid: int | None, start: int | None) -> bool:
    return pid is not None and start is not None and pid_start(pid) == start


def container_holding(merged: str) -> str | None:
    """The id of a live container of `run` that uses the leased mount at `merged`
    (`<runroot>/mounts/ID/merged`), or None.

    A container has a mount namespace of its own, copied from the one its mount was made in: once
    `run -d` returns, that namespace may be gone (`unshare -m flatmount run -d`) or the merged dir
    unmounted there, while the container still reads the image through its copy.  So the lease is
    live while a record under `<runroot>/containers` names the mount, is not released, and its
    owner (attached) or its init process (detached: pid and start time) is alive."""
    runroot = os.path.dirname(os.path.dirname(os.path.dirname(merged)))
    base = os.path.join(runroot, "containers")
    try:
        names = os.listdir(base)
    except OSError:
        return None
    for name in names:
        rec = read_record(os.path.join(base, name))
        if rec is None or rec.get("merged") != merged or rec.get("released"):
            continue
        if owner_alive(rec.get("owner_pid"), rec.get("owner_start")):
            return name
        pid = rec.get("init_pid")
        if isinstance(pid, int) and rec.get("detached"):
            start = rec.get("init_start")
            if owner_alive(pid, start) if start is not None else pid_start(pid) is not None:
                return name
    return None


def read_record(bundle_dir: str) -> dict | None:
    """The bundle's record, or None if the directory holds none (or an unreadable one)."""
    data = read_file_below(os.path.abspath(bundle_dir), RECORD)
    if data is None:
        return None
    import json  # only here: the mount/umount path reaches this module and must stay light

    try:
        rec = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(rec, dict):
        return None
    for key, types in _RECORD_TYPES.items():
        v = rec.get(key)
        if v is not None and (not isinstance(v, types) or (isinstance(v, bool) and bool not in types)):
            return None   # damaged: treated as unreadable (nothing is killed or removed on its say-so)
    if not all(isinstance(p, str) for p in rec.get("stubs") or []):
        return None
    return rec


# what every reader of a record relies on: a record with another type in one of these is damaged
_RECORD_TYPES: dict[str, tuple[type, ...]] = {
    "kind": (str,), "image": (str,), "runtime": (str,), "lease": (str,), "merged": (str,),
    "rootfs": (str,), "stubs": (list,), "boot_id": (str,), "owner_pid": (int,), "owner_start": (int,),
    "init_pid": (int,), "init_start": (int,), "created": (int, float), "exit_status": (int,),
    "detached": (bool,), "released": (bool,), "rm": (bool,), "runtime_created": (bool,),
}


