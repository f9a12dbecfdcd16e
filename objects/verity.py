"""fs-verity on stored files: enable it, measure it, and probe whether a file system offers it.

Objects are named by their fs-verity digest (4096-byte blocks, SHA-256, no salt), so where the
object directory's file system supports fs-verity (ext4/f2fs/btrfs built with it, the feature on),
each new object gets it enabled and its measured digest is compared with its name: from then on the
kernel refuses any read of a changed block, and overlayfs can be mounted with `verity=require`.
Where it is not supported (EOPNOTSUPP: a file system or kernel without it; ENOTTY: a file system
with no such ioctl, e.g. tmpfs) everything works as before, quietly; the store records which case
it is in `<objects>/.verity` (see `VerityState`), so a mount knows without probing every object.
"""

from __future__ import annotations

import errno
import os
import struct

from .errors import ObjectDigestMismatchError, ObjectStoreError

# linux/fsverity.h
FS_IOC_ENABLE_VERITY = 0x40806685    # _IOW('f', 133, struct fsverity_enable_arg), 128 bytes
FS_IOC_MEASURE_VERITY = 0xC0046686   # _IOWR('f', 134, struct fsverity_digest), 4-byte header
FS_VERITY_HASH_ALG_SHA256 = 1
BLOCK_SIZE = 4096
# struct fsverity_enable_arg: version, hash_algorithm, block_size, salt_size (u32); salt_ptr (u64);
#   sig_size, reserved1 (u32); sig_ptr (u64); reserved2[11] (u64)
ENABLE_ARG = struct.Struct("=4IQ2IQ11Q")
assert ENABLE_ARG.size == 128
MEASURE_HEAD = struct.Struct("=HH")  # digest_algorithm, digest_size (in: room for the digest)
DIGEST_SIZE = 32

STATE_FILE = ".verity"
#: `.verity` contents: every object of the directory has fs-verity ("all"), objects put since the
#: probe have it but older ones may not ("new"), or the file system refuses it ("off: <why>").
ALL, NEW, OFF = "all", "new", "off"
UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTTY)


class VerityUnsupportedError(ObjectStoreError):
    """The file system (or kernel) does not offer fs-verity; `errno` says how it refused."""

    def __init__(self, message: str, err: int):
        super().__init__(message)
        self.errno = err


def _ioctl(fd: int, request: int, arg: bytes) -> bytes:
    import fcntl

    return fcntl.ioctl(fd, request, arg)


def enable(fd: int) -> None:
    """Enable fs-verity (SHA-256, 4096-byte blocks, no salt) on the file open read-only at `fd`.

    Already enabled is fine.  Raises VerityUnsupportedError where the file system cannot, and
    ObjectStoreError for any other refusal (ETXTBSY: someone has it open for writing; EROFS; EFBIG...)."""
    arg = ENABLE_ARG.pack(1, FS_VERITY_HASH_ALG_SHA256, BLOCK_SIZE, 0, 0, 0, 0, 0, *([0] * 11))
    try:
        _ioctl(fd, FS_IOC_ENABLE_VERITY, arg)
    except OSError as e:
        if e.errno == errno.EEXIST:
            return
        if e.errno in UNSUPPORTED:
            raise VerityUnsupportedError(f"fs-verity is not supported here: {os.strerror(e.errno)}",
                                         e.errno) from None
        raise ObjectStoreError(f"cannot enable fs-verity: {errno.errorcode.get(e.errno, e.errno)} "
                               f"({os.strerror(e.errno)})") from None


def measure(fd: int) -> bytes | None:
    """The fs-verity digest the kernel enforces for `fd`'s file; None if it has none (or the file
    system has no fs-verity at all).  Other refusals raise ObjectStoreError."""
    try:
        out = _ioctl(fd, FS_IOC_MEASURE_VERITY, MEASURE_HEAD.pack(0, DIGEST_SIZE) + bytes(DIGEST_SIZE))
    except OSError as e:
        if e.errno == errno.ENODATA or e.errno in UNSUPPORTED:
            return None
        raise ObjectStoreError(f"cannot measure fs-verity: {errno.errorcode.get(e.errno, e.errno)} "
                               f"({os.strerror(e.errno)})") from None
    alg, size = MEASURE_HEAD.unpack_from(out)
    if alg != FS_VERITY_HASH_ALG_SHA256 or size != DIGEST_SIZE:
        return None   # enabled by someone else with another hash: not the digest objects are named by
    return bytes(out[MEASURE_HEAD.size:MEASURE_HEAD.size + size])


def enable_and_check(fd: int, expected: bytes, what: str) -> None:
    """Enable fs-verity on `fd` and check the kernel's digest is `expected` (the object's name)."""
    enable(fd)
    got = measure(fd)
    if got != expected:
        raise ObjectDigestMismatchError(
            f"{what}: the kernel's fs-verity digest is {got.hex() if got else 'missing'}, its name says "
            f"{expected.hex()}")


def probe(directory: str) -> tuple[bool, str]:
    """Whether files in `directory` can get fs-verity: (True, "") or (False, why), from a real try
    on a one-block temp file (removed again)."""
    name = os.path.join(directory, f".verity-probe-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        return False, f"cannot create a probe file: {os.strerror(e.errno)}"
    try:
        try:
            os.write(fd, bytes(BLOCK_SIZE))
        finally:
            os.close(fd)
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            enable(fd)
            ok = measure(fd) is not None
        finally:
            os.close(fd)
    except VerityUnsupportedError as e:
        return False, f"{errno.errorcode.get(e.errno, e.errno)} ({os.strerror(e.errno)})"
    except (OSError, ObjectStoreError) as e:
        return False, str(e)
    finally:
        try:
            os.unlink(name)
        except OSError:
            pass
    return (True, "") if ok else (False, "enabled but not measurable")


def read_state(directory: str) -> str | None:
    """The recorded state of an object directory: ALL, NEW, OFF, or None (never probed)."""
    try:
        fd = os.open(os.path.join(directory, STATE_FILE), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        word = os.read(fd, 256).decode("ascii", "replace").split(":", 1)[0].strip()
    except OSError:
        return None
    finally:
        os.close(fd)
    return word if word in (ALL, NEW, OFF) else None
