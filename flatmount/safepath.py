"""Paths other users cannot redirect: store roots, runtime dirs, their internal entries, output files.

Why: flatmount runs as root on directories named by configuration or the command line.  If another
user can rename, replace or symlink any component of such a path, root ends up deleting, writing or
mounting wherever that user likes.  The rules (like ssh's StrictModes):

- Every existing component of a store root or runroot, from `/` down, must be owned by root or the
  caller and not writable by group or others, unless it is sticky (like /tmp: others may create
  entries there but cannot rename or remove ours).  A symlink on the way is followed only if root or
  the caller owns it; its target is checked the same way.
- The store root and runroot themselves must be owned by the caller and writable by nobody else
  (sticky does not excuse them).  Missing components are created 0700, one at a time, through
  directory fds (never following a symlink).  A primary store root readable by others (e.g. 0755,
  which would let every user read every object) is changed to 0700 with a warning.
- Additional image stores are read-only and may belong to root with mode 0755: they get the owner
  (root or caller) and writability checks, not the 0700 rule.
- Internal entries (the DB, objects/, layers/, images/, tmp/, gc.lock, the runroot's mounts/) must be
  real directories/files: a symlink or a foreign owner there is refused, never followed.

Once a path passes, nobody but root and the caller can change what it names, so code using it by
path afterwards is safe; deletions in tmp/ still go through directory fds.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from flatmount.errors import OutputError, StoreError

SYMLINK_LIMIT = 40
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def warn(message: str) -> None:
    """A warning for a person: through the `flatmount` logger, printed on stderr when the application
    has not configured logging (the library prints nothing else)."""
    import logging

    log = logging.getLogger("flatmount")
    if not log.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("flatmount: warning: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.warning("%s", message)


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def _check_component(path: str, st: os.stat_result, what: str, given: str) -> None:
    """An existing directory on the way to `given`: root's or the caller's, not writable by others."""
    if st.st_uid not in (0, os.geteuid()):
        raise StoreError(f"{what} {given}: {path} is owned by uid {st.st_uid} (neither you nor root), who "
                         "could redirect it; use a path whose directories only you or root own")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise StoreError(f"{what} {given}: {path} is writable by group or others (mode {_mode(st)}), who "
                         f"could redirect it; run `chmod go-w {path}` or use another path")


def _split(path: str) -> list[str]:
    return [c for c in path.split("/") if c and c != "."]


def walk(path: str, what: str) -> tuple[str, list[str]]:
    """(real path of the longest existing prefix of `path`, the components still missing after it).

    Every existing component is checked (see module docstring); symlinks owned by root or the caller
    are followed, their targets checked too.  StoreError names the first unsafe component."""
    given = path
    euid = os.geteuid()
    todo = list(reversed(_split(os.path.abspath(path))))
    current = "/"
    _check_component("/", os.lstat("/"), what, given)
    links = 0
    while todo:
        name = todo.pop()
        if name == "..":
            current = os.path.dirname(current)
            continue
        nxt = os.path.join(current, name)
        try:
            st = os.lstat(nxt)
        except FileNotFoundError:
            missing = [name, *reversed(todo)]
            if ".." in missing:
                raise StoreError(f"{what} {given}: {nxt} does not exist") from None
            return current, missing
        except OSError as e:
            raise StoreError(f"{what} {given}: cannot inspect {nxt}: {e.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in (0, euid):
                raise StoreError(f"{what} {given}: {nxt} is a symbolic link owned by uid {st.st_uid} "
                                 "(neither you nor root); refusing to follow it")
            links += 1
            if links > SYMLINK_LIMIT:
                raise StoreError(f"{what} {given}: too many levels of symbolic links")
            target = os.readlink(nxt)
            if target.startswith("/"):
                current = "/"
            todo.extend(reversed(_split(target)))
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise StoreError(f"{what} {given}: {nxt} is not a directory")
        _check_component(nxt, st, what, given)
        current = nxt
    return current, []


def _check_final(path: str, st: os.stat_result, what: str, given: str, *, own: bool) -> None:
    """The directory itself: the caller's (`own`; else root's or the caller's), writable by nobody else."""
    euid = os.geteuid()
    if own and st.st_uid != euid:
        raise StoreError(f"{what} {given} is owned by uid {st.st_uid}, not by you (uid {euid}); "
                         "use a directory of your own")
    if not own and st.st_uid not in (0, euid):
        raise StoreError(f"{what} {given} is owned by uid {st.st_uid} (neither you nor root); refusing it")
    if st.st_mode & 0o022:
        raise StoreError(f"{what} {given} is writable by group or others (mode {_mode(st)}); "
                         f"run `chmod go-w {given}` or use another directory")


def check_dir(path: str, what: str, *, own: bool = True, private: bool = False,
              fix: bool = False) -> bool:
    """Check `path` (if it exists) and the way to it; True if it exists.

    `own`: must belong to the caller (else root or the caller).  `private`: a directory of the
    caller must have no group/other bits; with `fix` they are removed (and a warning says so; only
    a warning where they cannot be, e.g. on a read-only mount), else it is refused."""
    real, missing = walk(path, what)
    if missing:
        return False
    st = os.lstat(real)
    _check_final(real, st, what, path, own=own)
    if private and st.st_mode & 0o077 and st.st_uid == os.geteuid():
        if not fix:
            raise StoreError(f"{what} {path} is accessible to other users (mode {_mode(st)}); "
                             f"run `chmod 0700 {path}`")
        new = stat.S_IMODE(st.st_mode) & 0o7700
        try:
            os.chmod(real, new)
        except OSError as e:
            warn(f"{what} {path} has mode {_mode(st)}, which lets other users read it, and cannot be "
                 f"changed ({e.strerror}); run `chmod 0700 {path}`")
        else:
            warn(f"{what} {path} had mode {_mode(st)}, which let other users read it; changed it to "
                 f"{new:04o}")
    return True


def make_dir(path: str, what: str, mode: int = 0o700, *, private: bool = True, fix: bool = False) -> None:
    """Create `path` (missing components `mode`, through directory fds, never following a symlink)
    after checking the way to it; then check it as `check_dir(own=True, private=, fix=)` does."""
    real, missing = walk(path, what)
    if missing:
        fd = os.open(real, _DIR_FLAGS)
        try:
            for name in missing:
                created = True
                try:
                    os.mkdir(name, mode, dir_fd=fd)
                except FileExistsError:
                    created = False
                try:
                    nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise StoreError(f"{what} {path}: {os.path.join(real, name)} appeared as a "
                                         "symbolic link or file while being created; refusing it") from None
                    raise
                os.close(fd)
                fd = nfd
                real = os.path.join(real, name)
                st = os.fstat(fd)
                if created and st.st_uid == os.geteuid():
                    os.fchmod(fd, mode)  # whatever the umask
                elif not created:
                    _check_component(real, st, what, path)
        finally:
            os.close(fd)
    check_dir(path, what, own=True, private=private, fix=fix)


def make_private_subdir(path: str, what: str) -> None:
    """`path` = PARENT/NAME, e.g. `<runroot>/mounts`: PARENT made or checked as by `make_dir` (not
    necessarily private), NAME a real directory of the caller, 0700 (other bits removed, with a
    warning), created through PARENT's fd."""
    parent, name = os.path.split(os.path.abspath(path))
    make_dir(parent, what, private=False)
    fd = os.open(parent, _DIR_FLAGS if not os.path.islink(parent) else _DIR_FLAGS & ~os.O_NOFOLLOW)
    try:
        created = True
        try:
            os.mkdir(name, 0o700, dir_fd=fd)
        except FileExistsError:
            created = False
        check_entry(parent, name, "dir", f"{what} {parent}")
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if created:
            os.chmod(name, 0o700, dir_fd=fd)
        elif st.st_mode & 0o077:
            os.chmod(name, 0o700, dir_fd=fd)
            warn(f"{path} had mode {_mode(st)}; changed it to 0700")
    finally:
        os.close(fd)


def check_private_subdir(path: str, what: str) -> bool:
    """Whether `path` = PARENT/NAME exists, after checking it as `make_private_subdir` would (without
    creating or changing anything)."""
    parent, name = os.path.split(os.path.abspath(path))
    if not check_dir(parent, what, own=True):
        return False
    return check_entry(parent, name, "dir", f"{what} {parent}")


def check_entry(directory: str, name: str, kind: str, what: str, *, own: bool = True) -> bool:
    """An internal entry `directory/name` of `kind` 'dir' or 'file', if it exists: a real one (not a
    symlink), the caller's (`own`; else root's or the caller's), writable by nobody else.  True if
    it exists."""
    path = os.path.join(directory, name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise StoreError(f"{what}: cannot inspect {path}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise StoreError(f"{what}: {path} is a symbolic link; a store's internal entries must be real "
                         f"{'directories' if kind == 'dir' else 'files'} (remove the link)")
    ok = stat.S_ISDIR(st.st_mode) if kind == "dir" else stat.S_ISREG(st.st_mode)
    if not ok:
        raise StoreError(f"{what}: {path} is not a {'directory' if kind == 'dir' else 'regular file'}")
    euid = os.geteuid()
    if (st.st_uid != euid) if own else (st.st_uid not in (0, euid)):
        raise StoreError(f"{what}: {path} is owned by uid {st.st_uid}, not by you (uid {euid})")
    if st.st_mode & 0o022:
        raise StoreError(f"{what}: {path} is writable by group or others (mode {_mode(st)}); "
                         f"run `chmod go-w {path}`")
    return True


def open_dir_nofollow(path: str, what: str, dir_fd: int | None = None) -> int | None:
    """An fd of directory `path` opened without following a symlink; None if it does not exist."""
    try:
        return os.open(path, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise StoreError(f"{what}: {path} is a symbolic link or not a directory; refusing it") from None
        raise StoreError(f"{what}: cannot open {path}: {e.strerror}") from None


def remove_tree_at(dir_fd: int, name: str) -> None:
    """Remove `name` in directory `dir_fd` and everything below it, through directory fds only, so a
    symlink (even one swapped in meanwhile) is removed itself, never followed.  Iterative."""
    fd = _subdir(dir_fd, name)
    if fd is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
        return
    stack: list[tuple[int, str, int, list[str]]] = [(dir_fd, name, fd, os.listdir(fd))]
    try:
        while stack:
            pfd, pname, fd, names = stack[-1]
            if names:
                child = names.pop()
                cfd = _subdir(fd, child)
                if cfd is None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(child, dir_fd=fd)
                else:
                    try:
                        stack.append((fd, child, cfd, os.listdir(cfd)))
                    except BaseException:
                        os.close(cfd)
                        raise
                continue
            stack.pop()
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(pname, dir_fd=pfd)
    finally:
        for _pfd, _pname, fd, _names in stack:
            os.close(fd)


def _subdir(dir_fd: int, name: str) -> int | None:
    """fd of subdirectory `name` (made writable by us so its entries can go); None if not a dir."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP, errno.ENOENT):
            return None
        raise
    with contextlib.suppress(OSError):
        st = os.fstat(fd)
        if not st.st_mode & stat.S_IWUSR and st.st_uid == os.geteuid():
            os.fchmod(fd, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)
    return fd


# --- output files given by a user --------------------------------------------------------------------

def check_output(path: str | os.PathLike) -> None:
    """`path` may be written (replaced by rename) only if it does not exist or is a regular file: never
    a symlink (its target would stay, its name be replaced), a device such as /dev/full, a FIFO or a
    directory.  OutputError otherwise."""
    p = os.fspath(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return
    except OSError as e:
        raise OutputError(f"cannot write {p}: {e.strerror}") from None
    if stat.S_ISREG(st.st_mode):
        return
    raise OutputError(f"output {p} is {_kind(st.st_mode)}: flatmount writes only new or regular files "
                      "(give another path, or `-` for stdout where offered)")


# --- input files -------------------------------------------------------------------------------------

def _kind(mode: int) -> str:
    return ("a symbolic link" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file")


def open_regular(path: str, what: str, *, follow: bool, dir_fd: int | None = None,
                 error: type[Exception] = StoreError):
    """`path` opened for reading (a binary file object) if it is a regular file; `error` otherwise.

    Without `follow` a symlink is refused as such, its target never looked at (an error must not tell
    what a link points at).  FIFOs, devices and sockets are refused before they could block or have
    side effects: checked with (l)stat first, opened O_NONBLOCK, then checked again with fstat."""
    import fcntl

    try:
        st = os.stat(path, dir_fd=dir_fd, follow_symlinks=follow)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise error(f"cannot open {what}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} is {_kind(st.st_mode)}, not a regular file: refused")
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP and not follow:
            raise error(f"{what} is a symbolic link, not a regular file: refused") from None
        raise error(f"cannot open {what}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} is {_kind(st.st_mode)}, not a regular file: refused")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_parent_below(root: str, parts: list[str], *, error: type[Exception] | None = None,
                      what: str = "") -> int | None:
    """An fd of the directory holding `parts[-1]` below `root`, every component opened with O_NOFOLLOW.

    Without `error`: None if one is absent, not a directory or a symlink.  With it: a component that
    is a symlink or not a directory raises `error` naming it (prefixed by `what`), and any other
    OSError propagates."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        if error is not None:
            raise
        return None
    try:
        for i, p in enumerate(parts[:-1]):
            try:
                nfd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as e:
                if error is not None and e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise error(f"{what}: {root}/{'/'.join(parts[:i + 1])} is not a directory "
                                "(a symbolic link?): refused") from None
                raise
            os.close(fd)
            fd = nfd
    except OSError:
        os.close(fd)
        if error is not None:
            raise
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_file_below(root: str, path: str, limit: int = 1 << 20) -> bytes | None:
    """Content of `path` inside the tree at `root`, every component opened with O_NOFOLLOW (a symlink
    anywhere on the way counts as absent: it could point out of the image); None if absent."""
    parts = [p for p in path.split("/") if p and p != "."]
    if any(p == ".." for p in parts) or not parts:
        return None
    fd = open_parent_below(root, parts)
    if fd is None:
        return None
    try:
        nfd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        import stat

        if not stat.S_ISREG(os.fstat(nfd).st_mode):
            return None
        return os.read(nfd, limit)
    finally:
        os.close(nfd)
