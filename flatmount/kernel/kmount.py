"""Low-level kernel mounts: an EROFS metadata image under a read-only overlay (the mount.composefs job).

`mount_image(image, mountpoint, object_dirs)` mounts the image with erofs (file-backed, or on a
read-only auto-clearing loop device when the kernel refuses a file source), stacks overlayfs on top
with the image as the only normal lower layer and each objects dir as a data-only lower layer, mounts
that `ro,nosuid,nodev` at `mountpoint` in the caller's mount namespace, and leaves the erofs mount
attached nowhere: only the overlay keeps it alive, so unmounting the overlay frees everything
(erofs superblock, loop device).  No store knowledge lives here.

Ways to hand the erofs layer to overlayfs, best first (`api=`):
- "fd": new mount API, `lowerdir+` given the detached erofs mount fd (Linux 6.13+);
- "path": new mount API, `lowerdir+=/proc/self/fd/N` naming the detached erofs mount (6.8+);
- "mount2": erofs via the new API, overlay via mount(2) `lowerdir=/proc/self/fd/N::obj1::obj2` (6.5+);
- "legacy": mount(2) only (fsopen blocked, e.g. by a seccomp profile): erofs attached at a private
  temporary dir, passed by path, and detached once the overlay holds it.
"auto" tries them in that order and remembers what this kernel accepts.

Every kernel refusal becomes a `MountError` naming the step, the errno and what to check; EPERM
becomes `PermissionRequiredError`.
"""

from __future__ import annotations

import contextlib
import errno as E
import fcntl
import os
import stat
import struct
import time

from flatmount.errors import MountError, PermissionRequiredError
from flatmount.log import debug
from flatmount.record import record
from objects.compiled import load

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: CLI start-up, see objects/lazy.py)
if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Sequence

__all__ = ["MountEntry", "find_mount", "is_mountpoint", "mount_id", "mount_image", "not_ours_reason",
           "umount_image"]

# --- syscall numbers -------------------------------------------------------------------------------
# The mount-API syscalls arrived after the unified syscall table (424+): the same numbers on x86_64,
# aarch64, arm, riscv, ppc, s390, i386.  Only alpha (+110) and mips (ABI offsets) differ.
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432
SYS_MOUNT_SETATTR = 442
_UNIFIED_SYSCALL_TABLE = not os.uname().machine.lower().startswith(("alpha", "mips"))

FSOPEN_CLOEXEC = 0x1
FSMOUNT_CLOEXEC = 0x1

FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_SET_FD = 5
FSCONFIG_CMD_CREATE = 6

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8

MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_SYMLINKS = 0x10

AT_FDCWD = -100
AT_NO_AUTOMOUNT = 0x800

# mount(2) / umount2(2)
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

# statx(2)
STATX_BASIC_STATS = 0x7FF
STATX_ATTR_MOUNT_ROOT = 0x2000
_STATX_SIZE = 256
_STATX_ATTRIBUTES_OFF = 8        # __u64 stx_attributes
_STATX_ATTRIBUTES_MASK_OFF = 56  # __u64 stx_attributes_mask
_STATX_MNT_ID_OFF = 144          # __u64 stx_mnt_id
STATX_MNT_ID_UNIQUE = 0x4000

# loop devices (linux/loop.h)
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16
LO_NAME_SIZE = 64
# struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit (u64);
#   lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags (u32);
#   lo_file_name[64], lo_crypt_name[64], lo_encrypt_key[32]; lo_init[2] (u64)
LOOP_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")
# struct loop_config: fd, block_size (u32); struct loop_info64 info; __u64 __reserved[8]
LOOP_CONFIG = struct.Struct("=2I" + LOOP_INFO64.format.lstrip("=") + "8Q")
assert LOOP_INFO64.size == 232 and LOOP_CONFIG.size == 304

_OVERLAY_ATTRS = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
_EROFS_ATTRS = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV  # not noexec: it serves inline files
_LOOP_RETRIES = 16
APIS = ("auto", "fd", "path", "mount2", "legacy")
_AUTO_ORDER = ("fd", "path", "mount2")
_learned_api: str | None = None  # what "auto" found this kernel accepts

# The raw calls compiled (flatmount/kernel/_ksys.c: no ctypes at start-up), else through ctypes below.
_ksys = load("flatmount.kernel._ksys")


# --- errors ----------------------------------------------------------------------------------------
class _Unsupported(Exception):
    """This way of mounting is not available on this kernel; try the next one."""


def _errname(err: int) -> str:
    return E.errorcode.get(err, f"errno {err}")


def _error(step: str, err: int, advice: str | None = None, kernel: Sequence[str] = ()) -> MountError:
    """The user-facing error for a refused step: errno name, kernel messages, what to check."""
    msg = f"{step}: {_errname(err)} ({os.strerror(err)})"
    if kernel:
        msg += "; kernel: " + "; ".join(kernel)
    if err == E.EPERM:
        msg += "; mounting and unmounting need root (CAP_SYS_ADMIN in the initial user namespace)"
        if advice:
            msg += f"; {advice}"
        return PermissionRequiredError(msg, err)
    if advice:
        msg += f"; check: {advice}"
    return MountError(msg, err)


def _read_fc_log(fd: int) -> list[str]:
    """Messages the kernel queued on an fs context ("e ...", "w ...", "i ..." lines)."""
    out: list[str] = []
    for _ in range(32):
        try:
            b = os.read(fd, 1024)
        except OSError:  # ENODATA: queue empty
            break
        if not b:
            break
        out.append(b.decode("utf-8", "replace").rstrip("\n"))
    return out


class _KernelLog:
    """New /dev/kmsg records from erofs, overlayfs and loop since construction (best effort).

    erofs and overlayfs mostly explain refusals in the kernel log, not on the fs context."""

    PREFIXES = ("erofs", "overlayfs")

    def __init__(self) -> None:
        self.fd = -1
        try:
            self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.lseek(self.fd, 0, os.SEEK_END)
        except OSError:
            self.close()

    def lines(self) -> list[str]:
        out: list[str] = []
        if self.fd < 0:
            return out
        for _ in range(1000):
            try:
                rec = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except OSError as e:  # EPIPE: records overwritten; keep reading
                if e.errno == E.EPIPE:
                    continue
                break
            if not rec:
                break
            text = rec.decode("utf-8", "replace").split(";", 1)[-1].split("\n", 1)[0]
            if text.startswith(self.PREFIXES):
                out.append(text)
        return out[-5:]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- raw calls: the ctypes code is the specification of flatmount/kernel/_ksys.c ---------------------
class _Libc:
    """libc through ctypes, loaded on first use (importing ctypes costs about 1 ms)."""

    _lib = None

    @classmethod
    def get(cls):
        if cls._lib is None:
            import ctypes

            lib = ctypes.CDLL(None, use_errno=True)
            lib.syscall.restype = ctypes.c_long
            lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                                  ctypes.c_char_p]
            lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
            cls._lib = lib
        return cls._lib


def _raise_errno(*filename: str) -> None:
    import ctypes

    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), *filename)


def _sys_ctypes(nr: int, *args: int | bytes | bytearray | None) -> int:
    import ctypes

    cargs = [ctypes.c_long(a) if isinstance(a, int) else
             (ctypes.c_char * len(a)).from_buffer(a) if isinstance(a, bytearray) else a for a in args]
    r = _Libc.get().syscall(ctypes.c_long(nr), *cargs)
    if r < 0:
        _raise_errno()
    return int(r)


def _mount2_ctypes(source: bytes | None, target: bytes, fstype: bytes | None, flags: int,
                   data: bytes | None) -> None:
    if _Libc.get().mount(source, target, fstype, flags, data) != 0:
        _raise_errno()


def _umount2_ctypes(target: bytes, flags: int) -> None:
    if _Libc.get().umount2(target, flags) != 0:
        _raise_errno()


def _statx_ctypes(dirfd: int, path: bytes, flags: int, mask: int) -> bytes:
    import ctypes

    buf = ctypes.create_string_buffer(_STATX_SIZE)
    fn = getattr(_Libc.get(), "statx", None)
    if fn is None:
        raise OSError(E.ENOSYS, os.strerror(E.ENOSYS), os.fsdecode(path))
    if fn(ctypes.c_int(dirfd), path, ctypes.c_int(flags), ctypes.c_uint(mask), buf) != 0:
        _raise_errno(os.fsdecode(path))
    return buf.raw


if _ksys is not None:
    _sys_raw, _mount_raw, _umount_raw, _statx_raw = _ksys.syscall, _ksys.mount, _ksys.umount2, _ksys.statx
else:
    _sys_raw, _mount_raw, _umount_raw, _statx_raw = _sys_ctypes, _mount2_ctypes, _umount2_ctypes, _statx_ctypes


def _sys(nr: int, *args: int | bytes | bytearray | None) -> int:
    """syscall(nr, ...): integers as longs, bytes-likes as pointers to their bytes (a bytearray is the
    kernel's to write); raises OSError(errno)."""
    return _sys_raw(nr, *args)


def _b(s: str) -> bytes:
    return os.fsencode(s)


def _mount2(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _mount_raw(None if source is None else _b(source), _b(target), None if fstype is None else _b(fstype),
               flags, None if data is None else _b(data))


def _umount2(target: str, flags: int) -> None:
    _umount_raw(_b(target), flags)


class _FsContext:
    """An fsopen() context: fsconfig calls whose refusals carry the context's log messages."""

    def __init__(self, fstype: str, klog: _KernelLog, label: str):
        self.fstype = fstype
        self.name = f"{fstype} {label}"
        self.klog = klog
        if not _UNIFIED_SYSCALL_TABLE:
            raise _Unsupported("new mount API syscall numbers unknown on this architecture")
        try:
            self.fd = _sys(SYS_FSOPEN, _b(fstype), FSOPEN_CLOEXEC)
        except OSError as e:
            if e.errno == E.ENOSYS:
                raise _Unsupported("fsopen") from None
            advice = {
                "erofs": "the kernel has no erofs filesystem: `modprobe erofs` (CONFIG_EROFS_FS)",
                "overlay": "the kernel has no overlay filesystem: `modprobe overlay` (CONFIG_OVERLAY_FS)",
            }[fstype] if e.errno == E.ENODEV else None
            raise _error(f"{self.name}: fsopen", e.errno, advice) from None

    def fail(self, step: str, err: int, advice: str | None = None) -> MountError:
        return _error(f"{self.name}: {step}", err, advice, _read_fc_log(self.fd) + self.klog.lines())

    def set_string(self, key: str, value: str, advice: str | None = None) -> None:
        try:
            _sys(SYS_FSCONFIG, self.fd, FSCONFIG_SET_STRING, _b(key), _b(value), 0)
        except OSError as e:
            raise self.fail(f"fsconfig {key}={value}", e.errno, advice) from None

    def set_flag(self, key: str) -> None:
        try:
            _sys(SYS_FSCONFIG, self.fd, FSCONFIG_SET_FLAG, _b(key), None, 0)
        except OSError as e:
            raise self.fail(f"fsconfig {key}", e.errno) from None

    def set_fd(self, key: str, fd: int) -> None:
        _sys(SYS_FSCONFIG, self.fd, FSCONFIG_SET_FD, _b(key), None, fd)

    def create(self, advice: dict[int, str]) -> None:
        """Create the superblock; `advice` maps errno to what to check (key 0: any other errno)."""
        try:
            _sys(SYS_FSCONFIG, self.fd, FSCONFIG_CMD_CREATE, None, None, 0)
        except OSError as e:
            raise self.fail("creating the superblock (fsconfig CMD_CREATE)", e.errno,
                            advice.get(e.errno, advice.get(0))) from None

    def mount(self, attrs: int) -> int:
        try:
            return _sys(SYS_FSMOUNT, self.fd, FSMOUNT_CLOEXEC, attrs)
        except OSError as e:
            raise self.fail("fsmount", e.errno) from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- loop devices ----------------------------------------------------------------------------------
def _loop_attach(image: str, direct_io: bool = True) -> tuple[int, str]:
    """A free loop device bound read-only and auto-clearing to `image`: (open fd, /dev/loopN).

    The device clears itself when its last user goes away, so the caller keeps the fd open only
    until the filesystem on it holds the device, then closes it; no detach is ever needed."""
    try:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise _error("loop: open /dev/loop-control", e.errno,
                     "loop device support: `modprobe loop` (CONFIG_BLK_DEV_LOOP)") from None
    try:
        img = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        os.close(ctl)
        raise _error(f"loop: open {image}", e.errno) from None
    try:
        name = _b(image)[: LO_NAME_SIZE - 1]
        flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR | (LO_FLAGS_DIRECT_IO if direct_io else 0)
        for _ in range(_LOOP_RETRIES):
            try:
                n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            except OSError as e:
                raise _error("loop: LOOP_CTL_GET_FREE", e.errno, "free loop devices (`losetup -a`)") from None
            dev = f"/dev/loop{n}"
            try:
                lfd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                time.sleep(0.01)  # devtmpfs node not there yet
                continue
            except OSError as e:
                raise _error(f"loop: open {dev}", e.errno) from None
            cfg = LOOP_CONFIG.pack(img, 0, 0, 0, 0, 0, 0, 0, 0, 0, flags, name, b"", b"", 0, 0, *([0] * 8))
            try:
                fcntl.ioctl(lfd, LOOP_CONFIGURE, cfg)
            except OSError as e:
                os.close(lfd)
                if e.errno == E.EBUSY:  # another process took this device between GET_FREE and here
                    continue
                if e.errno == E.EINVAL and flags & LO_FLAGS_DIRECT_IO:  # backing fs without O_DIRECT
                    flags &= ~LO_FLAGS_DIRECT_IO
                    continue
                raise _error(f"loop: LOOP_CONFIGURE {dev} with {image}", e.errno) from None
            return lfd, dev
        raise _error("loop: LOOP_CONFIGURE", E.EBUSY, "every free loop device was taken concurrently; retry")
    finally:
        os.close(img)
        os.close(ctl)


# --- mounting --------------------------------------------------------------------------------------
def _escape_lowerdir(path: str) -> str:
    """overlayfs' legacy option syntax: `\\`, `,` and `:` escaped with a backslash."""
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def _check_inputs(image: str, mountpoint: str, object_dirs: Sequence[str]) -> None:
    """Refuse obviously wrong arguments before the kernel does, with the path in the message."""
    try:
        st = os.stat(image)
    except OSError as e:
        raise _error(f"image {image}", e.errno, "that the image file exists and is readable") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise _error(f"image {image}", E.EINVAL, "the image must be a regular file (or block device)")
    for d in object_dirs:
        try:
            st = os.stat(d)
        except OSError as e:
            raise _error(f"objects dir {d}", e.errno, "that the objects directory exists") from None
        if not stat.S_ISDIR(st.st_mode):
            raise _error(f"objects dir {d}", E.ENOTDIR, "objects dirs must be directories")
    try:
        st = os.stat(mountpoint)
    except OSError as e:
        raise _error(f"mountpoint {mountpoint}", e.errno, "the mountpoint must be an existing directory") from None
    if not stat.S_ISDIR(st.st_mode):
        raise _error(f"mountpoint {mountpoint}", E.ENOTDIR, "the mountpoint must be a directory")
    if not object_dirs:
        raise MountError(f"mounting {image}: no object directory given: the image's files live in one "
                         "(XX/<62 hex> layout); pass it with --objects DIR", E.EINVAL)
    if is_mountpoint(mountpoint):
        raise MountError(f"mounting {image}: {mountpoint} is already a mount point; mounting again "
                         "would hide it: unmount it first (flatmount umount-image)", E.EBUSY)


_NO_FILE_SOURCE = (E.ENOTBLK, E.EOPNOTSUPP)
_EROFS_ADVICE = {
    0: "that the file is an EROFS image (`fsck.erofs`/`dump.erofs`); the kernel log (`dmesg | grep erofs`)",
    E.ENODEV: "the kernel has no erofs filesystem: `modprobe erofs` (CONFIG_EROFS_FS)",
    E.EACCES: "that the image (or loop device) can be opened read-only",
    **dict.fromkeys(_NO_FILE_SOURCE,
                    "this kernel cannot mount EROFS from this file directly (file-backed mounts need "
                    "Linux 6.12+ with CONFIG_EROFS_FS_BACKED_BY_FILE and a backing filesystem that "
                    "supports them, e.g. not tmpfs); allow a loop device"),
}
_OVERLAY_ADVICE = {
    0: "overlayfs with data-only lower layers (Linux 6.5+); the kernel log (`dmesg | grep overlayfs`)",
}
_MOVE_ADVICE = {
    E.ENOENT: "the mountpoint must exist",
    E.ENOTDIR: "the mountpoint must be a directory",
    E.EINVAL: "the mountpoint must be reachable in this mount namespace",
}


def _quietly(fn, *args) -> None:
    """A cleanup step that must not turn a finished mount into a failure (tests check for leftovers)."""
    with contextlib.suppress(OSError):
        fn(*args)


class _Mounter:
    """One mount_image call: owns every fd, loop device, temporary mount and dir it creates."""

    def __init__(self, image: str, mountpoint: str, object_dirs: list[str], loop: bool | None,
                 verity: bool = False):
        self.image = image
        self.verity = verity
        self.mountpoint = mountpoint
        self.object_dirs = object_dirs
        self.loop = loop
        self.klog = _KernelLog()
        self.stack = contextlib.ExitStack()
        self.stack.callback(self.klog.close)

    # erofs --------------------------------------------------------------------------------------
    def _with_source(self, attach):
        """Call attach(source) on the image file, or on a loop device when asked or refused."""
        blockdev = stat.S_ISBLK(os.stat(self.image).st_mode)
        if not self.loop or blockdev:
            try:
                return attach(self.image)
            except MountError as e:
                if blockdev or self.loop is False or e.errno not in _NO_FILE_SOURCE:
                    raise
                debug("erofs: the kernel refused the file %s as a source (%s): using a loop device",
                      self.image, _errname(e.errno))
        lfd, dev = _loop_attach(self.image)
        debug("erofs: %s bound read-only to loop device %s", self.image, dev)
        try:
            return attach(dev)
        finally:
            os.close(lfd)  # the erofs superblock holds the device now (or nothing does: autoclear)

    def erofs_fd(self) -> int:
        """A detached, read-only erofs mount of the image (new mount API)."""

        def attach(source: str) -> int:
            fc = _FsContext("erofs", self.klog, source)
            try:
                fc.set_string("source", source)
                fc.set_flag("ro")
                fc.create(_EROFS_ADVICE)
                return fc.mount(_EROFS_ATTRS)
            finally:
                fc.close()

        fd = self._with_source(attach)
        self.stack.callback(os.close, fd)
        return fd

    def erofs_dir(self) -> str:
        """The image mounted with mount(2) at a private temporary dir, detached again on exit."""
        import tempfile  # (here: with shutil and random behind it, 7 ms of every command's start-up)

        tmp = tempfile.mkdtemp(prefix="flatmount-erofs-")
        self.stack.callback(_quietly, os.rmdir, tmp)
        try:
            # a private bind of the dir onto itself, so the erofs mount never propagates to peers
            _mount2(tmp, tmp, None, MS_BIND, None)
            self.stack.callback(_quietly, _umount2, tmp, MNT_DETACH)
            _mount2(None, tmp, None, MS_PRIVATE, None)
        except OSError as e:
            raise _error(f"erofs: private bind mount of {tmp}", e.errno, kernel=self.klog.lines()) from None

        def attach(source: str) -> None:
            try:
                _mount2(source, tmp, "erofs", MS_RDONLY | MS_NOSUID | MS_NODEV, None)
            except OSError as e:
                advice = _EROFS_ADVICE.get(e.errno, _EROFS_ADVICE[0])
                raise _error(f"erofs {source}: mount(2) on {tmp}", e.errno, advice,
                             self.klog.lines()) from None
            self.stack.callback(_quietly, _umount2, tmp, MNT_DETACH)

        self._with_source(attach)
        return tmp

    # overlay ------------------------------------------------------------------------------------
    def overlay_newapi(self, erofs_fd: int, by_fd: bool) -> None:
        fc = _FsContext("overlay", self.klog, f"at {self.mountpoint}")
        try:
            fc.set_string("source", self.image)
            try:
                if by_fd:
                    fc.set_fd("lowerdir+", erofs_fd)
                else:
                    fc.set_string("lowerdir+", f"/proc/self/fd/{erofs_fd}")
            except MountError as e:  # a string-only lowerdir+ (< 6.13) or no lowerdir+ at all (< 6.8)
                if e.errno == E.EINVAL:
                    raise _Unsupported(str(e)) from None
                raise
            except OSError as e:
                if e.errno == E.EINVAL:
                    raise _Unsupported("lowerdir+ by fd") from None
                raise fc.fail("fsconfig lowerdir+=<erofs mount fd>", e.errno) from None
            for d in self.object_dirs:
                fc.set_string("datadir+", d, "overlayfs data-only lower layers need Linux 6.5+ (datadir+ 6.8+)")
            for key, value in overlay_options(self.verity):
                fc.set_string(key, value, "overlayfs `verity=` needs Linux 6.6+" if key == "verity" else None)
            fc.set_flag("ro")
            fc.create(_OVERLAY_ADVICE)
            mfd = fc.mount(_OVERLAY_ATTRS)
        finally:
            fc.close()
        try:
            _sys(SYS_MOVE_MOUNT, mfd, b"", AT_FDCWD, _b(self.mountpoint),
                 MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_SYMLINKS)
        except OSError as e:
            raise _error(f"overlay: move_mount to {self.mountpoint}", e.errno,
                         _MOVE_ADVICE.get(e.errno), self.klog.lines()) from None
        finally:
            os.close(mfd)

    def overlay_mount2(self, lower: str) -> None:
        layers = "::".join(_escape_lowerdir(p) for p in [lower, *self.object_dirs])
        data = ",".join([f"lowerdir={layers}", *(f"{k}={v}" for k, v in overlay_options(self.verity))])
        try:
            _mount2(self.image, self.mountpoint, "overlay", MS_RDONLY | MS_NOSUID | MS_NODEV, data)
        except OSError as e:
            advice = {
                E.ENODEV: "`modprobe overlay`",
                E.EINVAL: "overlayfs data-only lower layers (`::`) need Linux 6.5+; the kernel log "
                          "(`dmesg | grep overlayfs`)",
                E.ENOTDIR: "the mountpoint must be a directory",
            }.get(e.errno)
            raise _error(f"overlay: mount(2) on {self.mountpoint} with {data}", e.errno, advice,
                         self.klog.lines()) from None

    def run(self, api: str) -> str:
        """Mount with `api` (one of APIS minus "auto"); returns it."""
        if api == "legacy":
            self.overlay_mount2(self.erofs_dir())
            return api
        fd = self.erofs_fd()
        if api == "mount2":
            self.overlay_mount2(f"/proc/self/fd/{fd}")
        else:
            self.overlay_newapi(fd, by_fd=(api == "fd"))
        return api


def overlay_options(verity: bool = False) -> list[tuple[str, str]]:
    """The overlay options besides the layers.  `verity`: `verity=require`, so every file's data
    must come from an object whose fs-verity digest the kernel checks against the image's metacopy
    digest; only for mounts whose objects (and image) all have fs-verity (flatmount.mount decides)."""
    opts = [("metacopy", "on"), ("redirect_dir", "on")]
    if verity:
        opts.append(("verity", "require"))
    return opts


def mount_image(image: str, mountpoint: str, object_dirs: Sequence[str], *,
                loop: bool | None = None, api: str = "auto", verity: bool = False) -> None:
    """Mount EROFS `image` read-only at `mountpoint`, its redirects served from `object_dirs`.

    `loop`: None uses the file directly and a loop device only if the kernel refuses the file;
    True always uses a loop device; False never does.  `api`: see the module doc (tests force each).
    `verity`: overlay `verity=require` (see `overlay_options`)."""
    global _learned_api
    if api not in APIS:
        raise ValueError(f"api must be one of {APIS}, not {api!r}")
    image = os.path.abspath(image)
    mountpoint = os.path.abspath(mountpoint)
    dirs = [os.path.abspath(d) for d in object_dirs]
    _check_inputs(image, mountpoint, dirs)
    if api != "auto":
        order: tuple[str, ...] = (api,)
    elif _learned_api is not None:
        order = (_learned_api,)
    else:
        order = (*_AUTO_ORDER, "legacy")
    last: _Unsupported | None = None
    for attempt in order:
        m = _Mounter(image, mountpoint, dirs, loop, verity)
        try:
            with m.stack:
                m.run(attempt)
        except _Unsupported as e:
            debug("mount %s: the %r mount path is unavailable (%s): trying the next", mountpoint,
                  attempt, e)
            last = e
            continue
        if api == "auto":
            _learned_api = attempt
        debug("mounted %s at %s through the %r mount path", image, mountpoint, attempt)
        return
    raise _error(f"mounting {image} ({'/'.join(order)})", E.ENOSYS,
                 f"the new mount API or overlayfs data-only layers are unavailable ({last})")


# --- unmounting and inspection ---------------------------------------------------------------------
def umount_image(mountpoint: str, *, lazy: bool = False, only_ours: bool = False) -> None:
    """Unmount what mount_image mounted; erofs and any loop device go with the overlay.

    Without `lazy` a busy mount is refused (EBUSY) rather than hidden and kept alive.  `only_ours`
    (the CLI's default): refuse a mount that does not look like one of ours (`not_ours_reason`), so a
    mistyped path never unmounts somebody else's file system."""
    mountpoint = os.path.abspath(mountpoint)
    if only_ours:
        entry = find_mount(mountpoint)
        if entry is None:   # not a mount point (umount2 says so below), or one mountinfo does not name
            reason = "not found in /proc/self/mountinfo" if is_mountpoint(mountpoint) else None
        else:
            reason = not_ours_reason(entry)
        if reason is not None:
            raise MountError(f"refusing to unmount {mountpoint}: not a flatmount mount ({reason}); "
                             "pass --force to unmount it anyway", E.EINVAL)
    try:
        _umount2(mountpoint, UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0))
    except OSError as e:
        advice = None
        if e.errno == E.EINVAL:
            advice = (f"{mountpoint} is not a mount point" if not is_mountpoint(mountpoint)
                      else "the kernel refused the unmount")
        elif e.errno == E.ENOENT:
            advice = f"{mountpoint} does not exist"
        elif e.errno == E.EBUSY:
            advice = ("files are open or processes have their cwd there (`fuser -vm " + mountpoint
                      + "`); unmount lazily (--lazy) to detach it now and free it when they are gone")
        raise _error(f"unmounting {mountpoint}", e.errno, advice) from None


def _image_kind(path: str) -> str:
    """"composefs" (EROFS with the composefs header), "erofs", "missing" or "other".

    Opened without following symlinks and without blocking (a FIFO named like an image)."""
    from flatmount.image import format as fmt

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        return "missing"
    except OSError:
        return "other"
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            return "other"
        head = os.pread(fd, fmt.KIND_PROBE, 0)
    except OSError:
        return "other"
    finally:
        os.close(fd)
    return fmt.image_kind(head)


def _loop_backing_file(dev: str) -> str | None:
    """The file behind /dev/loopN (sysfs), or None if `dev` is not a bound loop device."""
    name = os.path.basename(dev)
    if not (dev.startswith("/dev/loop") and name[4:].isdigit()):
        return None
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            return f.read().rstrip("\n").removesuffix(" (deleted)")
    except OSError:
        return None


def not_ours_reason(entry: MountEntry) -> str | None:
    """Why `entry` is not a mount flatmount makes, or None if it is one.

    Ours are (1) read-only overlays with metacopy and redirect_dir on, data-only lower layers
    (`datadir+=` or `lowerdir=a::b`) and, as source, the EROFS image they serve (or a path that no
    longer exists: an image removed while mounted); (2) erofs mounts of a composefs-layout image
    (file-backed or on a loop device), e.g. a legacy mount's temporary layer left by a killed process."""
    opts = set(entry.super_options)
    if entry.fstype == "overlay":
        if "ro" not in entry.options and "ro" not in opts:
            return "a writable overlay"
        if not {"metacopy=on", "redirect_dir=on"} <= opts:
            return "an overlay without metacopy=on,redirect_dir=on"
        if not any(o.startswith("datadir+=") or (o.startswith("lowerdir=") and "::" in o) for o in opts):
            return "an overlay without data-only lower layers"
        kind = _image_kind(entry.source)
        if kind not in ("composefs", "erofs", "missing"):
            return f"an overlay whose source {entry.source} is not an EROFS image"
        return None
    if entry.fstype == "erofs":
        source = _loop_backing_file(entry.source) or entry.source
        if _image_kind(source) != "composefs":
            return f"an erofs mount of {source}, not a composefs-layout image"
        return None
    return f"a {entry.fstype} mount"


def _statx(path: str, mask: int) -> bytes:
    """statx(2) of `path` (no automount, following a final symlink as stat does): the raw struct;
    OSError on failure (ENOSYS where neither the kernel nor libc has statx)."""
    return _statx_raw(AT_FDCWD, _b(path), AT_NO_AUTOMOUNT, mask)


def _statx_mount_root(path: str) -> bool | None:
    """STATX_ATTR_MOUNT_ROOT of `path` (Linux 5.8+), or None where statx cannot tell."""
    try:
        buf = _statx(path, STATX_BASIC_STATS)
    except OSError as e:
        if e.errno == E.ENOSYS:
            return None
        raise
    (attrs,) = struct.unpack_from("=Q", buf, _STATX_ATTRIBUTES_OFF)
    (mask,) = struct.unpack_from("=Q", buf, _STATX_ATTRIBUTES_MASK_OFF)
    if not mask & STATX_ATTR_MOUNT_ROOT:
        return None
    return bool(attrs & STATX_ATTR_MOUNT_ROOT)


def mount_id(path: str) -> int | None:
    """The unique (never reused) id of the mount at `path` (STATX_MNT_ID_UNIQUE, Linux 6.8+), or None."""
    try:
        buf = _statx(path, STATX_MNT_ID_UNIQUE)
    except OSError:
        return None
    (mask,) = struct.unpack_from("=I", buf, 0)
    if not mask & STATX_MNT_ID_UNIQUE:
        return None
    return struct.unpack_from("=Q", buf, _STATX_MNT_ID_OFF)[0]


def is_mountpoint(path: str) -> bool:
    """Whether something is mounted at `path` (False if it does not exist)."""
    try:
        r = _statx_mount_root(path)
    except OSError:
        return False
    if r is not None:
        return r
    return find_mount(path) is not None


@record
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    parent_id: int
    root: str
    mountpoint: str
    options: frozenset[str]        # per-mount: ro, nosuid, nodev, relatime...
    propagation: tuple[str, ...]   # shared:N, master:N, ...
    fstype: str
    source: str
    super_options: tuple[str, ...]


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    if "\\" not in field:
        return field
    raw = os.fsencode(field)
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and raw[i + 1: i + 4].isdigit() and len(raw[i + 1: i + 4]) == 3:
            out.append(int(raw[i + 1: i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def mounts(mountinfo: str = "/proc/self/mountinfo") -> list[MountEntry]:
    """The calling process' mount table (or that of another `/proc/PID/mountinfo`), in mount order."""
    out = []
    with open(mountinfo, "rb") as f:
        for line in f:
            left, _, right = os.fsdecode(line.rstrip(b"\n")).partition(" - ")
            a = left.split(" ")
            b = right.split(" ")
            out.append(MountEntry(
                mount_id=int(a[0]), parent_id=int(a[1]), root=_unescape(a[3]), mountpoint=_unescape(a[4]),
                options=frozenset(a[5].split(",")), propagation=tuple(a[6:]), fstype=b[0],
                source=_unescape(b[1]), super_options=tuple(b[2].split(",")) if len(b) > 2 else (),
            ))
    return out


def find_mount(path: str) -> MountEntry | None:
    """The topmost mount at `path` (resolved), or None if nothing is mounted there."""
    target = os.path.realpath(path)
    found = None
    for m in mounts():
        if m.mountpoint == target:
            found = m
    return found
