"""A client of skopeo's image proxy (`skopeo experimental-image-proxy`, the containers-image-proxy protocol).

Why skopeo: it already speaks every transport of containers/image (registries with auth, TLS,
mirrors and registries.conf, oci-archive:, docker-archive:, docker-daemon: ...), and its proxy hands
each blob over as the read end of a pipe, so a layer streams from the network straight into our
importer without a temporary copy.

The protocol (skopeo 1.9.3 speaks 0.2.3): one SOCK_SEQPACKET socketpair, the child's end passed as
`--sockfd`; a request is one packet `{"method", "args"}`, the reply one packet `{"success", "value",
"pipeid", "error"}`, with the read end of a pipe attached (SCM_RIGHTS) for GetManifest/GetBlob.  The
server handles requests one at a time; a blob is written into its pipe by a goroutine and the pipe's
write end is closed only by `FinishPipe`, which waits for that goroutine and reports its error (a
blob cut off, a digest that did not match).  So `FinishPipe` must run while the pipe is being read,
and it blocks the server meanwhile: a `Proxy` therefore streams one blob at a time, and concurrent
fetches use one proxy process each.

The child gets PR_SET_PDEATHSIG(SIGKILL) (from the thread that starts it, which must outlive it:
the signal follows the parent *thread*), so it dies with us even on kill -9; `close()` reaps it.  It
runs in a session of its own, so a terminal's Ctrl-C reaches only us and we decide how it ends
(an archive's proxy removes its unpacked copy when it exits on its own, not when killed).
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from flatmount.errors import RegistryError

if TYPE_CHECKING:  # pragma: no cover
    import subprocess

MAX_MSG = 32 * 1024  # the server's packet limit
MIN_VERSION = (0, 2, 1)
PIPE_SIZE = 1 << 20  # asked for on each blob pipe: fewer, larger reads than the default 64 KiB
_F_SETPIPE_SZ = 1031
_PR_SET_PDEATHSIG = 1


_prctl: Any = None


def _pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    # (no imports or allocations of note here: other threads' locks may be held in the child)
    _prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0)  # SIGKILL
    if os.getppid() != _parent:  # the parent died before prctl took effect
        os._exit(1)


_parent = -1


def _prepare_pdeathsig() -> None:
    """Resolve prctl(2) in the parent, so the child only calls it."""
    global _prctl, _parent
    if _prctl is None:
        import ctypes

        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    _parent = os.getpid()


class Proxy:
    """One `skopeo experimental-image-proxy` child: call methods, stream blobs.  A context manager."""

    def __init__(self, global_args: Sequence[str] = (), image_args: Sequence[str] = (),
                 skopeo: str = "skopeo") -> None:
        import shutil
        import subprocess
        import tempfile

        exe = shutil.which(skopeo)
        if exe is None:
            raise RegistryError("skopeo is not installed: it is needed to pull from registries and "
                                "archives (apt-get install skopeo)")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock = ours
        self._lock = threading.Lock()
        self.version: tuple[int, ...] = ()
        self._images: set[int] = set()
        self._killed = False
        # its stderr goes to a file, read only for error messages (a pipe nobody reads could fill up)
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        _prepare_pdeathsig()
        try:
            self._proc: subprocess.Popen | None = subprocess.Popen(
                [exe, *global_args, "experimental-image-proxy", *image_args, "--sockfd", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=self._stderr, preexec_fn=_pdeathsig, close_fds=True,  # noqa: PLW1509
                start_new_session=True)  # a terminal's Ctrl-C reaches us only: we wind the child down
        except OSError as e:
            ours.close()
            self._stderr.close()
            raise RegistryError(f"cannot start skopeo: {e.strerror}") from None
        finally:
            theirs.close()

    def initialize(self) -> None:
        """The protocol handshake (separate from starting, so several children start at once)."""
        try:
            version = self.call("Initialize")[0]
            parts = tuple(int(p) for p in str(version).split(".")[:3] if p.isdigit())
            if parts < MIN_VERSION:
                raise RegistryError(f"skopeo's image proxy speaks protocol {version}; at least "
                                    f"{'.'.join(map(str, MIN_VERSION))} is needed (upgrade skopeo)")
            self.version = parts
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc is not None else -1

    def _stderr_tail(self) -> str:
        """The last line skopeo wrote to stderr (after it exited), for error messages."""
        proc = self._proc
        if proc is None or proc.poll() is None:
            return ""
        with contextlib.suppress(OSError, ValueError):
            self._stderr.seek(0)
            lines = self._stderr.read()[-8192:].decode(errors="replace").strip().splitlines()
            if lines:
                return lines[-1]
        return ""

    def call(self, method: str, *args: Any) -> tuple[Any, int | None, int]:
        """(value, pipe fd or None, pipeid) of one request; RegistryError with skopeo's message."""
        req = json.dumps({"method": method, "args": list(args)}).encode()
        with self._lock:
            try:
                self._sock.sendall(req)
                msg, anc, _flags, _addr = self._sock.recvmsg(MAX_MSG, socket.CMSG_SPACE(4 * 4))
            except OSError as e:
                tail = self._stderr_tail()
                raise RegistryError(f"skopeo's image proxy went away during {method}"
                                    f"{': ' + tail if tail else f' ({e.strerror or e})'}") from None
        fds = array.array("i")
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        fd = fds[0] if fds else None
        for extra in fds[1:]:
            os.close(extra)
        if not msg:
            if fd is not None:
                os.close(fd)
            tail = self._stderr_tail()
            raise RegistryError(f"skopeo's image proxy exited during {method}{': ' + tail if tail else ''}")
        try:
            reply = json.loads(msg)
            if not isinstance(reply, dict):
                raise ValueError("not an object")
        except ValueError:
            if fd is not None:
                os.close(fd)
            raise RegistryError(f"skopeo's image proxy sent a malformed reply to {method}") from None
        if not reply.get("success"):
            if fd is not None:
                os.close(fd)
            raise RegistryError(str(reply.get("error") or f"{method} failed"))
        pipeid = reply.get("pipeid") or 0
        if fd is not None:
            with contextlib.suppress(OSError):
                import fcntl

                fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
        return reply.get("value"), fd, int(pipeid)

    def open_image(self, ref: str) -> int:
        value = self.call("OpenImage", ref)[0]
        if not isinstance(value, int) or value <= 0:
            raise RegistryError(f"skopeo's image proxy returned no image for {ref}")
        self._images.add(value)
        return value

    def close_image(self, image: int) -> None:
        self._images.discard(image)
        self.call("CloseImage", image)

    def read_small(self, method: str, *args: Any, limit: int) -> tuple[Any, bytes]:
        """(value, bytes) of a piped reply of at most `limit` bytes (manifest, config)."""
        value, fd, pipeid = self.call(method, *args)
        if fd is None:
            raise RegistryError(f"skopeo's image proxy sent no data for {method}")
        with BlobStream(self, fd, pipeid) as stream:
            data = stream.read_all(limit)
        return value, data

    def get_blob(self, image: int, digest: str, size: int) -> BlobStream:
        """A blob's bytes as a stream; use it as a context manager (FinishPipe's error is raised there)."""
        value, fd, pipeid = self.call("GetBlob", image, digest, size)
        if fd is None:
            raise RegistryError(f"skopeo's image proxy sent no pipe for blob {digest}")
        return BlobStream(self, fd, pipeid, size=value if isinstance(value, int) else None)

    def kill(self) -> None:
        """Stop the child now (interrupts every stream it feeds)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
            self._killed = True

    def shutdown(self) -> None:
        """Close the images it opened (an archive's source removes its unpacked copy only then: the
        proxy of skopeo 1.9 does not on exit), then tell it to exit; `close()` reaps it."""
        if self._images and not self._killed and self._proc is not None and self._proc.poll() is None:
            self._sock.settimeout(10)
            for image in sorted(self._images):
                with contextlib.suppress(RegistryError, OSError):
                    self.close_image(image)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Shut the child down and reap it."""
        proc, self._proc = self._proc, None
        with contextlib.suppress(OSError):
            self._sock.close()  # the server sees EOF and exits
        if proc is None:
            return
        import subprocess

        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._stderr.close()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlobStream:
    """The read end of a blob pipe, with `FinishPipe` running beside the reads.

    FinishPipe returns once the server has written everything (or failed), and only then is the
    write end closed, so reads end at the true end of the blob; its error, if any, is raised on
    leaving the `with` block (it explains an early end better than the importer can).  Leaving early
    closes our end first, so the server's writer fails instead of blocking.
    """

    def __init__(self, proxy: Proxy, fd: int, pipeid: int, size: int | None = None) -> None:
        self.fd = fd
        self.size = size
        self.nread = 0
        self.eof = False
        self._proxy = proxy
        self._error: BaseException | None = None
        self._finisher = threading.Thread(target=self._finish, args=(pipeid,), name="proxy-finishpipe",
                                          daemon=True)
        self._finisher.start()

    def _finish(self, pipeid: int) -> None:
        try:
            self._proxy.call("FinishPipe", pipeid)
        except BaseException as e:  # noqa: BLE001 - reported in __exit__
            self._error = e

    def read(self, n: int = -1) -> bytes:
        if self.fd < 0:
            return b""
        b = os.read(self.fd, PIPE_SIZE if n is None or n < 0 else n)
        self.nread += len(b)
        if not b:
            self.eof = True
        return b

    def readinto(self, buf: bytearray | memoryview) -> int:
        if self.fd < 0:
            return 0
        n = os.readv(self.fd, [buf])
        self.nread += n
        if not n:
            self.eof = True
        return n

    def readable(self) -> bool:
        return True

    def read_all(self, limit: int) -> bytes:
        out = bytearray()
        while True:
            b = self.read(65536)
            if not b:
                return bytes(out)
            out += b
            if len(out) > limit:
                raise RegistryError(f"a document from the image proxy is larger than {limit} bytes")

    def _close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> BlobStream:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._close_fd()  # (if we stopped early, the server's write now fails and FinishPipe returns)
        self._finisher.join()
        if self._error is None:
            return
        if exc_type is None:
            raise self._error
        if self.eof and isinstance(exc_type, type) and issubclass(exc_type, Exception):
            # the stream ended early because the server failed: its reason explains the importer's
            raise self._error from None
