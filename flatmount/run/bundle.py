"""OCI runtime bundles of flattened images: a leased private mount + `config.json` (see runspec.py).

`create_bundle(store, image, dir, opts)` mounts the image as `store.mount` does (a lease of its own,
a fresh private merged dir), writes `hostname`, `hosts`, `resolv.conf` and `config.json` into DIR,
and records what it did in `DIR/flatmount-bundle.json` so that `remove_bundle` (and `cleanup`, after
a crash) can undo exactly that and nothing else: files are removed by name, directories with rmdir.

Read-only roots cannot grow mount points.  When the image lacks one the runtime must mount on
(/proc, /dev, /sys, /tmp, /run, the /etc files, -v and --tmpfs targets), the root becomes a second
read-only overlay `DIR/rootfs` = `DIR/stubs` (just those empty dirs and files, their parents
carrying the image's own attributes) over the merged dir; otherwise `root.path` is the merged dir.

Order (crash safety): the record is written before the mount (owner pid, boot, time) and again with
the lease id after it; a process killed in between leaves a lease whose pid and time match the record,
which `cleanup_bundle` finds.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterator

from flatmount.errors import FlatmountError, MountError
from flatmount.record import record
from flatmount.run.runspec import ETC_FILES, RunOptions, build_spec, etc_files, image_path_kind, mount_targets
from flatmount.store.containers import RECORD, owner_alive, pid_start, read_record

BUNDLE_FILES = ("config.json", *ETC_FILES)


class BundleError(FlatmountError):
    """A bundle directory that cannot be created or is not a flatmount bundle."""


@record
class Bundle:
    """A ready bundle: `runc run -b dir ID` runs it.  `timings` in seconds (mount, spec, write)."""

    dir: str
    image: str
    image_id: str
    lease_id: str
    merged: str
    root: str
    stubs: tuple[str, ...]
    timings: dict


def _write_json(path: str, obj: dict) -> None:
    import json

    from flatmount.atomic import AtomicFile

    with AtomicFile(os.path.dirname(path), mode=0o600, durable=False) as af:
        af.file.write(json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n")
        af.commit(path)


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _mount_overlay(lowers: list[str], target: str) -> None:
    import ctypes

    from flatmount.kernel.kmount import MS_NODEV, MS_NOSUID, MS_RDONLY

    opts = "lowerdir=" + ":".join(p.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")
                                  for p in lowers)
    r = _libc().mount(b"overlay", os.fsencode(target), b"overlay", MS_RDONLY | MS_NOSUID | MS_NODEV,
                      opts.encode())
    if r != 0:
        err = ctypes.get_errno()
        raise MountError(f"mounting the mount-point overlay at {target}: {os.strerror(err)}", err)


def _make_stubs(merged: str, stubs_dir: str, missing: list[tuple[str, bool]]) -> list[str]:
    """Empty dirs/files for the missing mount targets under `stubs_dir`; every parent copies the
    image's mode, owner and times (the top overlay layer's directory attributes are what shows).
    Returns the created paths, deepest last (removal goes in reverse).  On failure, what it made is
    removed again (the record names only `stubs_dir` until this returns)."""
    created: list[str] = []
    try:
        return _make_stubs_into(merged, stubs_dir, missing, created)
    except BaseException as e:
        for p in reversed(created):
            with contextlib.suppress(OSError):
                if os.path.isdir(p) and not os.path.islink(p):
                    os.rmdir(p)
                else:
                    os.unlink(p)
        if isinstance(e, OSError) and not isinstance(e, FlatmountError):
            short = e.filename if len(str(e.filename)) < 200 else str(e.filename)[:120] + "..."
            raise BundleError(f"cannot add a mount point ({short}): {e.strerror}") from None
        raise


def _make_stubs_into(merged: str, stubs_dir: str, missing: list[tuple[str, bool]],
                     created: list[str]) -> list[str]:
    os.mkdir(stubs_dir, 0o755)
    created.append(stubs_dir)
    st = os.stat(merged)
    os.chmod(stubs_dir, st.st_mode & 0o7777)
    os.chown(stubs_dir, st.st_uid, st.st_gid)
    for path, is_dir in missing:
        parts = [p for p in path.split("/") if p]
        cur = ""
        for i, p in enumerate(parts):
            cur += "/" + p
            dest = stubs_dir + cur
            last = i == len(parts) - 1
            kind = image_path_kind(merged, cur)
            if os.path.lexists(dest):
                continue
            if not last:
                if kind not in (None, "dir"):
                    raise BundleError(f"cannot add mount point {path}: {cur} is not a directory in the image")
                os.mkdir(dest, 0o755)
                if kind == "dir":
                    pst = os.stat(merged + cur, follow_symlinks=False)
                    os.chmod(dest, pst.st_mode & 0o7777)
                    os.chown(dest, pst.st_uid, pst.st_gid)
                created.append(dest)
            elif is_dir:
                os.mkdir(dest, 0o755)
                created.append(dest)
            else:
                os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))
                created.append(dest)
    # parents' times last: creating children changed them
    for d in created:
        rel = d[len(stubs_dir):] or "/"
        if image_path_kind(merged, rel) == "dir":
            pst = os.stat(merged + rel if rel != "/" else merged, follow_symlinks=False)
            os.utime(d, ns=(pst.st_atime_ns, pst.st_mtime_ns), follow_symlinks=False)
    return created


def new_record(image: str, extra: dict | None = None) -> dict:
    """A bundle's first record: who creates it (pid, start time, boot), nothing mounted yet."""
    return {"version": 1, "image": image, "owner_pid": os.getpid(), "owner_start": pid_start(os.getpid()),
            "boot_id": _boot_id(), "created": time.time(), "lease": None, "stubs": [], "rootfs": None,
            **(extra or {})}


def write_record(bundle_dir: str, record: dict) -> None:
    _write_json(os.path.join(os.path.abspath(bundle_dir), RECORD), record)


def _prepare_dir(bundle_dir: str) -> str:
    from flatmount.safepath import check_dir

    d = os.path.abspath(bundle_dir)
    if not os.path.islink(d):
        # root writes config.json and mounts the rootfs in it: a directory (or a way to it) that
        # another user can change would let them swap entries for symlinks meanwhile (StrictModes)
        check_dir(d, "bundle directory", own=True)
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        if os.path.islink(d) or not os.path.isdir(d):
            raise BundleError(f"bundle directory {d} exists and is not a directory") from None
        if os.listdir(d):
            raise BundleError(f"bundle directory {d} is not empty (remove it, or `flatmount bundle "
                              "--remove` it if it is a bundle)") from None
    except FileNotFoundError:
        raise BundleError(f"cannot create bundle directory {d}: its parent does not exist") from None
    return d


def create_bundle(store, image: str, bundle_dir: str, opts: RunOptions | None = None, *,
                  container_id: str | None = None, extra: dict | None = None,
                  precreated: bool = False, net_hook: bool = True, netns_path: str | None = None) -> Bundle:
    """Mount `image` privately (leased) and write an OCI runtime bundle for it at `bundle_dir`.

    `net_hook`: a bundle run by the runtime alone gets its network set up by a `createRuntime` hook
    (`flatmount net-hook MODE`) where the runtime would leave it otherwise (runc raises `lo` in a
    new namespace: `--net none` takes it down); `run` does that step itself, in process."""
    from flatmount.mount import mount_image_ref, umount

    opts = opts or RunOptions()
    t0 = time.perf_counter()
    if precreated:   # the caller made the directory with its record (new_record) in one step
        d = os.path.abspath(bundle_dir)
        record = read_record(d)
        if record is None:
            raise BundleError(f"{d} has no bundle record")
    else:
        d = _prepare_dir(bundle_dir)
        record = new_record(image, extra)
        _write_json(os.path.join(d, RECORD), record)
    timings: dict[str, float] = {}
    lease = None
    try:
        rec_image = store.resolve_image(image)
        lease = mount_image_ref(store, image)
        record["lease"] = lease.id
        record["merged"] = lease.merged
        _write_json(os.path.join(d, RECORD), record)
        t1 = time.perf_counter()
        timings["mount"] = t1 - t0
        missing = [(p, is_dir) for p, is_dir in mount_targets(opts)
                   if image_path_kind(lease.merged, p) != ("dir" if is_dir else "file")]
        root = lease.merged
        if missing:
            for p, is_dir in missing:
                k = image_path_kind(lease.merged, p)
                if k is not None:
                    raise BundleError(f"cannot mount on {p}: the image has a {k} there, not a "
                                      f"{'directory' if is_dir else 'file'}")
            stubs_dir = os.path.join(d, "stubs")
            record["stubs"] = [stubs_dir]
            _write_json(os.path.join(d, RECORD), record)
            created = _make_stubs(lease.merged, stubs_dir, missing)
            record["stubs"] = created
            root = os.path.join(d, "rootfs")
            record["rootfs"] = root  # recorded first: a kill between the two leaves nothing unknown
            _write_json(os.path.join(d, RECORD), record)
            os.mkdir(root, 0o755)
            _mount_overlay([stubs_dir, lease.merged], root)
        cid = container_id or os.path.basename(d)
        spec = build_spec(root, d, rec_image.config, opts, cid, image_root=lease.merged,
                          cache_dir=store.runroot_str, netns_path=netns_path)
        if net_hook and opts.net == "none":
            spec["hooks"] = {"createRuntime": [net_hook_spec(opts.net)]}
        t2 = time.perf_counter()
        timings["spec"] = t2 - t1
        for name, data in etc_files(spec["hostname"], opts.net).items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        import json

        # json.dumps, not json.dump: only a one-shot encoding without indent runs the C encoder (dump
        # walks the spec, its seccomp profile mostly, in Python: ~5 ms of every container start)
        with open(os.path.join(d, "config.json"), "wb") as f:
            f.write(json.dumps(spec, separators=(",", ":")).encode())
        timings["write"] = time.perf_counter() - t2
    except BaseException:
        with contextlib.suppress(Exception):
            _undo(store, d, record, umount)
        raise
    return Bundle(d, image, rec_image.id, lease.id, lease.merged, root, tuple(record["stubs"]), timings)


def net_hook_spec(mode: str) -> dict:
    """The runtime hook that runs `flatmount net-hook MODE` (this interpreter, this flatmount)."""
    import sys

    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return {"path": sys.executable, "args": [sys.executable, "-m", "flatmount", "net-hook", mode],
            "env": [f"PYTHONPATH={pkg_parent}", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "timeout": 30}


def _boot_id() -> str:
    from objects.writemode import boot_id

    return boot_id()


def _check_record(d: str, record: dict) -> None:
    """A record only ever names paths inside its own bundle dir: anything else was not written by
    flatmount, and nothing is removed on its say-so."""
    stubs_dir = os.path.join(d, "stubs")
    rootfs = record.get("rootfs")
    stubs = record.get("stubs") or []
    bad = (rootfs not in (None, os.path.join(d, "rootfs"))
           or not isinstance(stubs, list)
           or any(not isinstance(p, str) or (p != stubs_dir and not p.startswith(stubs_dir + "/"))
                  or "/../" in p + "/" for p in stubs))
    if bad:
        raise BundleError(f"the record of bundle {d} names paths outside it: not removing anything "
                          f"(inspect {os.path.join(d, RECORD)})")


def _private_dir(d: str) -> bool:
    """Whether `d` and the way to it are the caller's (or root's) and writable by nobody else."""
    from flatmount.safepath import check_dir

    try:
        return check_dir(d, "bundle directory", own=True)
    except FlatmountError:
        return False


def _remove_below(d: str, path: str) -> None:
    """Remove the file or empty directory `path` inside bundle dir `d`, every component below `d`
    opened without following symlinks: a `stubs` swapped for a symlink must not make us delete
    what it points at."""
    import errno
    import stat

    parts = [p for p in os.path.relpath(path, d).split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for p in parts[:-1]:
            nfd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
        st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(parts[-1], dir_fd=fd)
        else:
            os.unlink(parts[-1], dir_fd=fd)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise BundleError(f"{path} is reached through a symlink or a non-directory in bundle {d}: "
                          "not removing it (inspect the bundle)") from None
    finally:
        os.close(fd)


def _undo(store, d: str, record: dict, umount, keep_record: bool = False, force: bool = False) -> None:
    """Unmount and remove what the record says this bundle made (rmdir only for directories);
    `keep_record`: leave the record and the directory (a stopped container `ps -a` still lists).
    A bundle (not a container of `run`) that another mount namespace still shows (a container runc
    made of it) is refused, or with `force` detached with its lease kept (`held_elsewhere`)."""
    from flatmount.errors import NotFoundError
    from flatmount.kernel.kmount import is_mountpoint, umount_image
    from flatmount.mount import find_lease, held_elsewhere

    _check_record(d, record)
    rootfs = record.get("rootfs")
    lease = None
    if record.get("lease"):
        try:
            lease = find_lease(store, record["lease"])
        except NotFoundError:
            pass
    if lease is not None:
        # the bundle's creator made its lease: a record naming another's mount (copied, forged
        # in a directory someone else can write) must not unmount it
        if (record.get("merged") not in (None, lease.merged) or lease.pid != record.get("owner_pid")
                or lease.boot_id != record.get("boot_id")):
            raise BundleError(f"the record of bundle {d} names lease {lease.id}, which is not its "
                              "mount: not touching it")
    via = None
    if lease is not None and record.get("kind") != "container" and is_mountpoint(lease.merged):
        mounted_root = (rootfs,) if rootfs and is_mountpoint(rootfs) else ()
        via = held_elsewhere(lease, force=force, also=mounted_root)
    if via is None and rootfs and is_mountpoint(rootfs):
        umount_image(rootfs)
    if lease is not None:
        try:
            umount(store, lease.id, container_done=True, detach_via=via)
        except NotFoundError:
            pass
    if rootfs:
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(rootfs)
    # stubs the record does not list (a bundle or run killed while making them) go too, through dir
    # fds, where nobody else can have put anything there: a container's dir under the runroot
    # (0700), or a bundle dir that is the caller's and not writable by others (as create requires)
    ours = ((record.get("kind") == "container"
             and os.path.dirname(d) == os.path.join(store.runroot_str, "containers"))
            or _private_dir(d))
    for p in reversed(record.get("stubs") or []):
        try:
            _remove_below(d, p)
        except OSError as e:
            if not (ours and e.errno == errno.ENOTEMPTY):
                raise
    if ours:
        from flatmount.safepath import remove_tree_at

        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            remove_tree_at(dfd, "stubs")
        finally:
            os.close(dfd)
    for name in BUNDLE_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(d, name))
    if keep_record:
        record.update(lease=None, rootfs=None, stubs=[], released=True)
        _write_json(os.path.join(d, RECORD), record)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(d, RECORD))
    if ours:
        remove_record_temps(d)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(d)


def remove_record_temps(d: str) -> None:
    """Temp files of a record write cut short by a kill (AtomicFile's `.tmp-*`) in the dir `d`."""
    for name in os.listdir(d):
        if name.startswith(".tmp-"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(d, name))


def remove_bundle(store, bundle_dir: str, *, keep_record: bool = False, force: bool = False) -> dict:
    """Unmount a bundle made by `create_bundle`, release its lease, remove its files and directory
    (all but the record with `keep_record`).  `force`: even while a container runc made of it runs
    (its lease then stays, detached, until that container is gone).  Returns the record."""
    from flatmount.mount import umount

    d = os.path.abspath(bundle_dir)
    record = read_record(d)
    if record is None:
        raise BundleError(f"{d} is not a flatmount bundle (no {RECORD})")
    if record.get("lease") is None and not record.get("released"):
        record["lease"] = _find_lost_lease(store, record)
    _undo(store, d, record, umount, keep_record, force)
    return record


def update_record(bundle_dir: str, **changes) -> dict:
    """Rewrite the record with `changes` (atomically); returns the new record."""
    d = os.path.abspath(bundle_dir)
    record = read_record(d)
    if record is None:
        raise BundleError(f"{d} is not a flatmount bundle (no {RECORD})")
    record.update(changes)
    _write_json(os.path.join(d, RECORD), record)
    return record


def _find_lost_lease(store, record: dict) -> str | None:
    """The lease of a bundle whose creator died between mounting and recording it: same pid and
    boot, created after the record, and that pid is not alive (a live pid is another process)."""
    from flatmount.mount import list_mounts

    pid = record.get("owner_pid")
    if owner_alive(pid, record.get("owner_start")):
        return None
    for lease in list_mounts(store):
        if (lease.pid == pid and lease.boot_id == record.get("boot_id")
                and (lease.created or 0) >= record.get("created", 0) - 1
                and pid_start(pid) is None):
            return lease.id
    return None


@contextlib.contextmanager
def bundle(store, image: str, bundle_dir: str, opts: RunOptions | None = None) -> Iterator[Bundle]:
    """`with bundle(store, "img", dir) as b:` a ready bundle, unmounted and removed after."""
    b = create_bundle(store, image, bundle_dir, opts)
    try:
        yield b
    finally:
        remove_bundle(store, b.dir)
