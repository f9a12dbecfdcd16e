"""Container networks over netlink (pyroute2), set up between `runc create` and `runc start`.

A mode is a `Network`: `namespace` says whether the container gets a network namespace of its own
(in the runtime spec), `setup(pid)` runs once the runtime has made it (its init process `pid` is
waiting for `start`), `teardown()` after the container is gone.  Netlink sockets are opened inside
the container's namespace by entering it with setns(2) on this thread only, just for the socket's
creation: the socket stays bound to that namespace, and no process or `ip` command is started.

pyroute2 costs about 0.1 s to import (more on a loaded machine), so the state of `lo` is first read
with one ioctl (SIOCGIFFLAGS) and netlink is used only to change it; where a change is expected
(loopback with a runtime that leaves lo down), `preload()` starts the import on a thread while
`runc create` runs.  `none` joins a namespace made beforehand, where lo is down from the start.

Modes: `loopback` (lo up: runc also brings it up, crun too; the netlink step makes it so whatever the
runtime did), `none` (lo down: nothing at all reaches the container), `host` (the host's namespace).
A bridge mode would be one more class: in `setup`, create a veth pair on the host (`link("add",
kind="veth")`), move its peer into the container's namespace (`net_ns_fd`), address and raise both
ends, attach the host end to a bridge with NAT/forwarding rules (nftables over netlink); in
`teardown`, delete the host end (the peer goes with it), and let `cleanup` delete veths whose
container is gone.  IP address management (a lease file per address under the runroot) is the
larger part of that work.
"""

from __future__ import annotations

import os
import threading

from flatmount.errors import FlatmountError

CLONE_NEWNET = 0x40000000
_preload: threading.Thread | None = None


class NetworkError(FlatmountError):
    """A network set-up the kernel refused (netlink error), named with what to check."""


def preload() -> None:
    """Import pyroute2 on a background thread (idempotent); `_iproute_class` joins it."""
    global _preload
    if _preload is None:
        def work() -> None:
            try:
                import pyroute2  # noqa: F401
            except ImportError:
                pass
        _preload = threading.Thread(target=work, name="flatmount-pyroute2", daemon=True)
        _preload.start()


def _iproute_class():
    if _preload is not None:
        _preload.join()
    try:
        from pyroute2 import IPRoute
    except ImportError:
        raise NetworkError("pyroute2 is not installed (pip install pyroute2): it sets up container "
                           "networks over netlink") from None
    return IPRoute


def in_netns(pid: int, make):
    """`make()` called on this thread inside the network namespace of process `pid`: the sockets it
    creates stay bound to that namespace."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    try:
        target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise NetworkError(f"cannot open the network namespace of container process {pid}: "
                           f"{e.strerror}") from None
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetworkError(f"cannot enter the network namespace of process {pid}: "
                               f"{os.strerror(err)} (needs CAP_SYS_ADMIN)")
        try:
            return make()
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:  # pragma: no cover - our own namespace
                err = ctypes.get_errno()
                raise NetworkError(f"cannot return to flatmount's network namespace: {os.strerror(err)}")
    finally:
        os.close(target)
        os.close(own)


def iproute_in(pid: int):
    """An IPRoute socket bound to the network namespace of process `pid`."""
    return in_netns(pid, _iproute_class())


IFF_UP = 0x1
SIOCGIFFLAGS = 0x8913


def link_flags(pid: int, ifname: str = "lo") -> int | None:
    """Interface flags of `ifname` in the namespace of `pid` (SIOCGIFFLAGS: a read costs no pyroute2
    import), or None if there is no such interface."""
    import _socket  # the C module: socket.py's enum set-up costs more than the whole check
    import fcntl
    import struct

    sock = in_netns(pid, lambda: _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC))
    try:
        req = struct.pack("16sH14x", ifname.encode(), 0)
        try:
            res = fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, req)
        except OSError:
            return None
        return struct.unpack("16sH14x", res)[1]
    finally:
        sock.close()


class Network:
    """No network of its own and nothing to do (`host`)."""

    name = "host"
    namespace = False
    preload = False      # whether setup will most likely need pyroute2 (import it early)

    def prepare(self) -> str | None:
        """Before the bundle is written: the path of a network namespace for the runtime to join, or
        None (the runtime makes a new one, or uses the host's)."""
        return None

    def joined(self) -> None:
        """After `create`: the runtime's container holds the namespace now."""

    def setup(self, pid: int) -> None:
        """Called with the container's init pid after `create`, before `start`."""

    def teardown(self) -> None:
        """Called after the container is gone (also on failures: must be idempotent)."""


class _LoState(Network):
    namespace = True
    up = True
    changed: bool | None = None   # whether setup had to change lo (None: not run yet)

    def setup(self, pid: int) -> None:
        try:
            shared = os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net")
        except OSError:
            shared = False   # in_netns says what is wrong with the pid
        if shared:
            # `net-hook` takes the pid from its stdin: never change lo of flatmount's own namespace
            raise NetworkError(f"process {pid} is in flatmount's own network namespace, not a "
                               "container's: not changing its `lo`")
        flags = link_flags(pid)
        if flags is not None and bool(flags & IFF_UP) == self.up:
            self.changed = False   # the runtime left it as wanted (runc raises lo itself)
            return
        self.changed = True
        ipr = iproute_in(pid)
        try:
            idx = ipr.link_lookup(ifname="lo")
            if not idx:
                raise NetworkError("the container's network namespace has no `lo`")
            ipr.link("set", index=idx[0], state="up" if self.up else "down")
        except NetworkError:
            raise
        except Exception as e:  # pyroute2's NetlinkError and friends
            raise NetworkError(f"cannot set `lo` {'up' if self.up else 'down'} in the container: {e}") from None
        finally:
            ipr.close()


class Loopback(_LoState):
    """Its own namespace with only `lo`, up: 127.0.0.1 works, the host's interfaces are not there."""

    name = "loopback"
    up = True


class NoNetwork(_LoState):
    """Its own namespace with `lo` down.

    runc raises `lo` in a namespace it creates, but not in one it is given to join: so the namespace
    is made beforehand, by a helper (`unshare --net cat`) that holds it until the container has
    joined it, and `lo` is down from the start (netlink would only be needed if the runtime raised
    it anyway; the flags are checked).  The helper reads its stdin: if flatmount dies, it ends too."""

    name = "none"
    up = False
    _helper = None

    def prepare(self) -> str | None:
        import shutil
        import subprocess
        import time

        unshare = shutil.which("unshare")
        if unshare is None:
            return None   # the runtime makes the namespace; setup takes lo down over netlink
        own = os.readlink("/proc/self/ns/net")
        self._helper = subprocess.Popen([unshare, "--net", "--", "cat"], stdin=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        path = f"/proc/{self._helper.pid}/ns/net"
        deadline = time.monotonic() + 10
        while True:
            try:
                if os.readlink(path) != own:
                    return path
            except OSError:
                pass
            if self._helper.poll() is not None or time.monotonic() > deadline:
                self.teardown()
                raise NetworkError("could not make a network namespace for the container "
                                   "(`unshare --net` failed: needs CAP_SYS_ADMIN)")
            time.sleep(0.0005)

    def joined(self) -> None:
        self.teardown()

    def teardown(self) -> None:
        h, self._helper = self._helper, None
        if h is not None:
            import contextlib

            with contextlib.suppress(OSError):
                h.stdin.close()
            try:
                h.wait(5)
            except Exception:  # noqa: BLE001 - a helper that does not end is killed
                h.kill()
                h.wait()


MODES: dict[str, type[Network]] = {"host": Network, "loopback": Loopback, "none": NoNetwork}


def network(mode: str) -> Network:
    try:
        return MODES[mode]()
    except KeyError:
        raise NetworkError(f"unknown network mode {mode!r}: use one of {', '.join(MODES)}") from None
