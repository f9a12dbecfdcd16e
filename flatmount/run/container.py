"""`flatmount run`: a container of a flattened image on a real OCI runtime (runc, or crun).

bundle (bundle.py: leased private mount + config.json) -> `runc create` -> network (net.py, netlink
into the new namespace) -> `runc start` -> wait -> `runc delete` + unmount.

Everything of a container lives under the runroot: `containers/<id>/` is its bundle (and record),
and runc keeps its state under `runc/` (`runc --root`), so `cleanup` can find a container whose
flatmount process died and remove it with its runtime state, mount and lease.

Waiting.  flatmount makes itself a child subreaper before `runc create`: when runc exits, the
container's init process is re-parented to flatmount, which waits for it directly and so gets its
real exit status (128+N after signal N, as shells and podman report it).  SIGINT, SIGTERM, SIGHUP,
SIGQUIT and SIGUSR1/2 received meanwhile are forwarded to that process; with `-t`, SIGWINCH copies
flatmount's window size to the container's terminal.  That process is pid 1 of its namespace, so the
kernel drops a signal it has no handler for: one it does not catch yet is sent again once it does
(`_Forwarder`), and SIGINT/SIGTERM/SIGHUP end the container with SIGKILL after STOP_TIMEOUT s.  One
arriving before `runc start` returned is acted on after it, or stops flatmount before the start.

Ownership (what `cleanup` may remove).  The record names the flatmount process that owns the
container (pid and start time); a detached container is owned by nobody once started.  `cleanup`
removes a container whose owner is gone and that is not a running detached one: it kills what is
left of it, deletes the runtime state, unmounts and releases the lease, and removes the directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

from flatmount.errors import FlatmountError, NotFoundError
from flatmount.record import field, record
from flatmount.run.bundle import (
    BundleError,
    create_bundle,
    remove_bundle,
    remove_record_temps,
    update_record,
)
from flatmount.run.runspec import RunOptions
from flatmount.store.containers import RECORD, owner_alive, pid_start, read_record

RUNTIMES = ("runc", "crun")
LOG = "ctr.log"     # stdout and stderr of a detached container
_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def valid_id(name: str) -> bool:
    """A container id runc takes: `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}` (checked without `re`, whose
    import is ~3 ms of a container's start in an interpreter that has not loaded it)."""
    return 0 < len(name) <= 128 and name.isascii() and name[0].isalnum() and _ID_CHARS.issuperset(name)
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
PR_SET_CHILD_SUBREAPER = 36


class ContainerRuntimeError(FlatmountError):
    """The OCI runtime failed (its own message is quoted)."""


@record
class RunResult:
    """A finished (or, with `detached`, started) container: `exit_status` is 128+N after signal N."""

    id: str
    image: str
    exit_status: int | None
    signal: int | None
    detached: bool
    timings: dict = field(default_factory=dict)


@record
class Container:
    """One container under the runroot, as `ps` lists it."""

    id: str
    image: str
    status: str          # created, running, paused, stopped, exited, or unknown
    exit_status: int | None
    pid: int | None
    created: float | None
    detached: bool
    owner_pid: int | None
    bundle: str


# --- paths and the runtime ------------------------------------------------------------------------

def containers_dir(store) -> str:
    return os.path.join(store.runroot_str, "containers")


def runtime_root(store, runtime: str) -> str:
    return os.path.join(store.runroot_str, runtime)


def _runtime_path(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ContainerRuntimeError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    path = _which(runtime)
    if path is None:
        raise ContainerRuntimeError(f"{runtime} is not installed (apt-get install {runtime})")
    return path


def _which(name: str) -> str | None:
    """`shutil.which(name)` without importing shutil (and the bz2, lzma and fnmatch it loads: ~3 ms of
    a container's start in an interpreter that has not loaded them)."""
    for d in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(d, name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


def _rt(store, runtime: str, *args: str, check: bool = True, capture: bool = True, **kw):
    """Run `runtime --root <runroot>/<runtime> ARGS`; a failure is a ContainerRuntimeError with its stderr."""
    import subprocess

    cmd = [_runtime_path(runtime), "--root", runtime_root(store, runtime), *args]
    if capture:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
    p = subprocess.run(cmd, **kw)
    if check and p.returncode != 0:
        msg = (p.stderr or b"").decode("utf-8", "replace").strip().splitlines()
        raise ContainerRuntimeError(f"{runtime} {args[0]} failed: {msg[-1] if msg else 'exit status ' + str(p.returncode)}")
    return p


def runtime_state(store, runtime: str, cid: str) -> dict | None:
    """`runc state ID` as a dict, or None when the runtime does not know the container."""
    import json

    try:
        p = _rt(store, runtime, "state", cid, check=False)
    except ContainerRuntimeError:
        return None
    if p.returncode != 0:
        return None
    try:
        return json.loads(p.stdout)
    except ValueError:
        return None


def _new_id(name: str | None) -> str:
    if name is None:
        return os.urandom(6).hex()
    if not valid_id(name):
        raise ContainerRuntimeError(f"invalid container name {name!r}: letters, digits, _ . - (at most 128)")
    return name


NEW_PREFIX = ".new-"   # `.new-<owner pid>-<owner start>-<id>`: a container dir before its rename


def _new_container_dir(base: str, cid: str, image: str, extra: dict) -> str:
    """`base/cid` with its record, made in one step (a private dir renamed into place without
    replacing anything), so `cleanup` never sees a container dir without a record."""
    import ctypes

    from flatmount.run.bundle import new_record, write_record

    cdir = os.path.join(base, cid)
    if os.path.lexists(cdir):
        raise ContainerRuntimeError(f"a container named {cid} exists (flatmount rm {cid})")
    tmp = os.path.join(base, f"{NEW_PREFIX}{os.getpid()}-{pid_start(os.getpid())}-{cid}")
    os.mkdir(tmp, 0o700)
    try:
        write_record(tmp, new_record(image, extra))
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.renameat2(-100, os.fsencode(tmp), -100, os.fsencode(cdir), 1) != 0:  # RENAME_NOREPLACE
            err = ctypes.get_errno()
            if err in (17, 39):   # EEXIST, ENOTEMPTY
                raise ContainerRuntimeError(f"a container named {cid} exists (flatmount rm {cid})")
            raise OSError(err, os.strerror(err), cdir)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(tmp, RECORD))
        with contextlib.suppress(OSError):
            os.rmdir(tmp)
        raise
    return cdir


def _set_subreaper(on: bool) -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)


def _status(wait_status: int) -> tuple[int, int | None]:
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        return 128 + sig, sig
    return os.WEXITSTATUS(wait_status), None


# --- run ------------------------------------------------------------------------------------------

def run(store, image: str, opts: RunOptions | None = None, *, name: str | None = None, rm: bool = False,
        detach: bool = False, runtime: str = "runc", stdin=None, stdout=None, stderr=None) -> RunResult:
    """Run a container of `image` on `runtime` and wait for it (or start it and return, `detach`).

    stdio (file objects or fds, default: this process's) are passed to the container's process;
    with `opts.terminal` they are relayed through a pseudo-terminal the runtime creates."""
    from flatmount.run import net
    opts = opts or RunOptions()
    network = net.network(opts.net)
    stop = _DeferredStop()
    with stop:
        return _run(store, image, opts, network, stop, name=name, rm=rm, detach=detach, runtime=runtime,
                    stdin=stdin, stdout=stdout, stderr=stderr)


class Terminated(FlatmountError):
    """flatmount was told to stop (SIGINT/SIGTERM/SIGHUP) before the container ran; it cleaned up."""


class _DeferredStop:
    """Until the container runs (then they are forwarded to it), SIGINT, SIGTERM and SIGHUP are
    noted, not acted on: `check()` between steps raises `Terminated`, so a stop request unwinds
    through every `finally` and never lands in the middle of a mount or its record."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: list[int] = []
        self._old: dict = {}

    def _note(self, signum, _frame) -> None:
        self.received.append(signum)

    def __enter__(self) -> _DeferredStop:
        for s in self.SIGNALS:
            with contextlib.suppress(ValueError, OSError):   # not the main thread: left alone
                self._old[s] = signal.signal(s, self._note)
        return self

    def check(self) -> None:
        if self.received:
            raise Terminated(f"stopped by signal {self.received[0]} before the container ran")

    def hold(self) -> None:
        """Back to noting (after the forwarding while the container ran): cleanup runs whole."""
        for s in self._old:
            with contextlib.suppress(ValueError, OSError):
                signal.signal(s, self._note)

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(s, h)


def _run(store, image: str, opts: RunOptions, network, stop: _DeferredStop, *, name, rm, detach, runtime,
         stdin, stdout, stderr) -> RunResult:
    from flatmount.run import net
    _runtime_path(runtime)
    if detach and opts.terminal:
        raise ContainerRuntimeError("-t with -d is not supported: a detached container's terminal needs a "
                                    "process to hold it after flatmount returns (podman has conmon)")
    cid = _new_id(name)
    base = containers_dir(store)
    # containers' records and the runtime's state are root's business: real 0700 dirs, never a
    # symlink someone planted in the runroot
    from flatmount.safepath import make_private_subdir

    make_private_subdir(base, "runroot")
    make_private_subdir(runtime_root(store, runtime), "runroot")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    cdir = _new_container_dir(base, cid, image, {"kind": "container", "id": cid, "runtime": runtime,
                                                 "rm": rm, "detached": False, "net": opts.net})
    try:
        netns_path = network.prepare()
        b = create_bundle(store, image, cdir, opts, container_id=cid, precreated=True, net_hook=False,
                          netns_path=netns_path)
    except BaseException:
        network.teardown()
        raise
    timings["mount"] = b.timings["mount"]
    timings["bundle"] = time.perf_counter() - t0 - timings["mount"]
    result: RunResult | None = None
    console = None
    try:
        stop.check()
        t = time.perf_counter()
        if not detach:   # a detached container must not stay a child of a long-lived API caller
            _set_subreaper(True)
        pid_file = os.path.join(cdir, "init.pid")
        args = ["create", "--bundle", cdir, "--pid-file", pid_file]
        if opts.terminal:
            from flatmount.run.console import ConsoleSocket

            sock = os.path.join(cdir, "console.sock")
            if len(os.fsencode(sock)) > 100:   # sun_path holds 108 bytes
                import tempfile

                sock = os.path.join(tempfile.mkdtemp(prefix="flatmount-tty-"), "console.sock")
            console = ConsoleSocket(sock)
            args += ["--console-socket", console.path]
        update_record(cdir, runtime_created=True)
        if network.preload:
            net.preload()   # imported while runc works
        if detach:   # nobody reads our stdio after we return: the container writes to its log
            import subprocess

            with open(os.path.join(cdir, LOG), "ab") as log:
                _rt(store, runtime, *args, cid, capture=False, check=False, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=log)
        else:
            _rt(store, runtime, *args, cid, capture=False, check=False, stdin=stdin, stdout=stdout,
                stderr=stderr)
        try:
            with open(pid_file) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            raise ContainerRuntimeError(f"{runtime} create did not create container {cid} (its error is "
                                "above)") from None
        timings["create"] = time.perf_counter() - t
        network.joined()
        stop.check()
        if console is not None:
            console.receive()
        t = time.perf_counter()
        network.setup(pid)
        timings["netlink"] = time.perf_counter() - t
        stop.check()
        t = time.perf_counter()
        if detach:
            _rt(store, runtime, "start", cid)
            update_record(cdir, detached=True, init_pid=pid, init_start=pid_start(pid))
            timings["start"] = time.perf_counter() - t
            result = RunResult(cid, image, None, None, True, timings)
            return result
        status = _start_and_wait(store, runtime, cid, pid, console, timings, t, stop)
        result = RunResult(cid, image, status[0], status[1], False, timings)
        return result
    finally:
        stop.hold()
        network.teardown()
        if not detach:
            _set_subreaper(False)
        if console is not None:
            console.close()
            if os.path.dirname(console.path) != cdir:
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.dirname(console.path))
        if result is None or not result.detached:
            t = time.perf_counter()
            _finish(store, cid, cdir, runtime, keep_record=not rm and result is not None,
                    exit_status=result.exit_status if result is not None else None,
                    exited=result is not None)
            timings["cleanup"] = time.perf_counter() - t


def _start_and_wait(store, runtime: str, cid: str, pid: int, console, timings: dict, t: float,
                    stop: _DeferredStop | None = None) -> tuple:
    fw = _Forwarder(pid)
    old = {}
    for s in FORWARDED:
        with contextlib.suppress(ValueError, OSError):  # not the main thread: no forwarding
            old[s] = signal.signal(s, fw.handler)

    def resize(_signum, _frame) -> None:
        console.copy_window_size()

    if console is not None:
        with contextlib.suppress(ValueError, OSError):
            old[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, resize)
    try:
        if stop is not None:
            stop.check()   # noted after the last check, before the forwarding began
        fw.check_before_start()
        _rt(store, runtime, "start", cid)
        fw.started()
        timings["start"] = time.perf_counter() - t
        if console is not None:
            console.relay_start()
        t = time.perf_counter()
        try:
            ws = fw.wait()
        except ChildProcessError:  # not re-parented to us (no subreaper): its status is lost
            _poll_exit(store, runtime, cid)
            raise ContainerRuntimeError(f"container {cid} ended but its exit status could not be "
                                        "read (its process was not re-parented to flatmount)") from None
        timings["wait"] = time.perf_counter() - t
        if console is not None:
            console.relay_stop()
        return _status(ws)
    finally:
        for s, h in old.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(s, h)
        fw.close()


STOP_TIMEOUT = 10.0   # s after a forwarded SIGINT/SIGTERM/SIGHUP before SIGKILL (podman stop's default)


_NOT_YET = -1


def _caught(pid: int) -> int | None:
    """The mask of signals process `pid` has handlers for (SigCgt), or None if it is gone.

    `_NOT_YET` while it is still the runtime's own init (`runc:[2:INIT]`, before its `exec`): its Go
    runtime catches every signal but passes none on, and one it does not expect ends it or is lost,
    so nothing is sent to it; what comes in meanwhile waits for the container's own program."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Name:") and line.split(b"\t", 1)[-1].startswith(b"runc:"):
                    return _NOT_YET
                if line.startswith(b"SigCgt:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        return None
    return None


class _Forwarder:
    """Signals for flatmount while the container runs, passed on to its init process.

    That process is pid 1 of its pid namespace: the kernel drops a signal it has no handler for
    (only SIGKILL gets through), e.g. one arriving after `exec` but before a shell's `trap`.  So a
    signal the process does not catch yet stays pending here and is sent again once it does; and a
    stop request (SIGINT, SIGTERM, SIGHUP) that has not ended the container after `timeout` s ends
    it with SIGKILL, so that `flatmount run` never outlives a request to stop by more than that.
    Signals before `runc start` only are noted: the container is then not started at all."""

    def __init__(self, pid: int, timeout: float = STOP_TIMEOUT) -> None:
        self.pid = pid
        self.timeout = timeout
        self.noted: list[int] = []
        self.pending: dict[int, float] = {}   # signal -> when it was first sent
        self.deadline: float | None = None
        self._started = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def handler(self, signum, _frame) -> None:
        if not self._started:
            self.noted.append(signum)
            return
        self._send(signum)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")   # the wait loop re-reads `pending` and its deadline

    def _send(self, signum: int) -> None:
        if signum in _DeferredStop.SIGNALS and self.deadline is None:
            self.deadline = time.monotonic() + self.timeout
        caught = _caught(self.pid)
        if caught == _NOT_YET:
            self.pending.setdefault(signum, time.monotonic())
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)
        if caught is not None and not caught >> (signum - 1) & 1:
            self.pending.setdefault(signum, time.monotonic())   # maybe dropped: sent again later

    def check_before_start(self) -> None:
        if self.noted:
            raise Terminated(f"stopped by signal {self.noted[0]} before the container ran")

    def started(self) -> None:
        """`runc start` returned: what came in meanwhile goes to the container now."""
        self._started = True
        noted, self.noted = self.noted, []
        for s in noted:
            self._send(s)

    def _retry(self) -> None:
        caught = _caught(self.pid)
        if caught is None:
            self.pending.clear()
            return
        now = time.monotonic()
        for s, since in list(self.pending.items()):
            if caught != _NOT_YET and caught >> (s - 1) & 1:
                del self.pending[s]
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, s)
            elif now - since > self.timeout:
                del self.pending[s]   # never caught: it was ignored, as for any pid 1

    def wait(self) -> int:
        """The wait status of the container's init; bounded once a stop request came in."""
        import select

        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:
            pidfd = None   # already reaped by nobody else but gone, or no pidfd: poll by timeout
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        if pidfd is not None:
            poller.register(pidfd, select.POLLIN)
        try:
            while True:
                done, ws = os.waitpid(self.pid, os.WNOHANG)
                if done:
                    return ws
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 4096)
                timeout = None if pidfd is not None else 0.05
                if self.pending:
                    self._retry()
                    if self.pending:
                        timeout = 0.02
                if self.deadline is not None:
                    left = self.deadline - time.monotonic()
                    if left <= 0:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(self.pid, signal.SIGKILL)
                        self.deadline = None
                        left = 0
                    timeout = left if timeout is None else min(timeout, left)
                poller.poll(None if timeout is None else max(1, int(timeout * 1000)))
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def close(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def _poll_exit(store, runtime: str, cid: str) -> None:
    while True:
        st = runtime_state(store, runtime, cid)
        if st is None or st.get("status") == "stopped":
            return
        time.sleep(0.05)


def _remove_runtime_leftover(store, runtime: str, cid: str) -> None:
    """An empty state dir the runtime left when it was killed before writing its state."""
    d = os.path.join(runtime_root(store, runtime), cid)
    if os.path.isdir(d) and not os.path.islink(d) and runtime_state(store, runtime, cid) is None:
        with contextlib.suppress(OSError):
            os.rmdir(d)


def _finish(store, cid: str, cdir: str, runtime: str, *, keep_record: bool,
            exit_status: int | None = None, exited: bool = False) -> None:
    """Kill what is left, delete the runtime state, unmount, release the lease; the record stays
    with `keep_record` (a stopped container that `ps -a` lists and `rm` removes).

    `exited`: its init was reaped, so no process of it is left to use the mount, and the runtime's
    `delete` (which needs only its own state) runs while the mount is released."""
    import subprocess

    record = read_record(cdir) or {}
    deleting = None
    if record.get("runtime_created") or runtime_state(store, runtime, cid) is not None:
        cmd = [_runtime_path(runtime), "--root", runtime_root(store, runtime), "delete", "--force", cid]
        deleting = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        if not exited:
            deleting.wait()
    try:
        _release(store, cid, cdir, runtime, keep_record, exit_status)
    finally:
        if deleting is not None:
            deleting.wait()
            _remove_runtime_leftover(store, runtime, cid)


def _release(store, cid: str, cdir: str, runtime: str, keep_record: bool, exit_status: int | None) -> None:
    for extra in ("init.pid", "console.sock") + (() if keep_record else (LOG,)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(cdir, extra))
    if read_record(cdir) is None:
        with contextlib.suppress(FileNotFoundError, OSError):
            os.rmdir(cdir)
        return
    if keep_record:
        update_record(cdir, exit_status=exit_status, finished=time.time(), runtime_created=False)
    remove_bundle(store, cdir, keep_record=keep_record)


# --- detached containers --------------------------------------------------------------------------

def _record_of(store, cid: str) -> tuple[str, dict]:
    if not valid_id(cid):
        raise NotFoundError(f"no container {cid!r}")
    cdir = os.path.join(containers_dir(store), cid)
    rec = read_record(cdir)
    if rec is None and os.path.lexists(os.path.join(cdir, RECORD)):
        raise BundleError(f"the record of container {cid} ({os.path.join(cdir, RECORD)}) is damaged: "
                          "nothing is done on its say-so (inspect it; `runc --root "
                          f"{runtime_root(store, 'runc')} list` shows the runtime's view)")
    if rec is None or rec.get("kind") != "container":
        raise NotFoundError(f"no container {cid!r} (see `flatmount ps -a`)")
    return cdir, rec


def list_containers(store, all_: bool = True) -> list[Container]:
    """Containers under the runroot, oldest first; without `all_` only created/running/paused ones."""
    out = []
    if not _containers_dir_exists(store):
        return []
    names = sorted(os.listdir(containers_dir(store)))
    for cid in names:
        if cid.startswith(NEW_PREFIX):
            continue
        cdir = os.path.join(containers_dir(store), cid)
        rec = read_record(cdir)
        if rec is None or rec.get("kind") != "container":
            continue
        runtime = rec.get("runtime", "runc")
        st = runtime_state(store, runtime, cid) if not rec.get("released") else None
        if st is not None:
            status, pid = st.get("status", "unknown"), st.get("pid") or None
        else:
            status, pid = ("exited" if rec.get("released") else "unknown"), None
        if not all_ and status not in ("created", "running", "paused"):
            continue
        out.append(Container(cid, rec.get("image", ""), status, rec.get("exit_status"), pid,
                             rec.get("created"), bool(rec.get("detached")), rec.get("owner_pid"), cdir))
    out.sort(key=lambda c: (c.created or 0, c.id))
    return out


def _containers_dir_exists(store) -> bool:
    """Whether `<runroot>/containers` exists, refusing (StoreError) one that is a symlink or not
    private: what it lists decides what gets killed, unmounted and removed."""
    from flatmount.safepath import check_private_subdir

    return check_private_subdir(containers_dir(store), "runroot")


def _owned(rec: dict) -> bool:
    """An attached container whose flatmount process is alive: that process cleans it up."""
    return not rec.get("detached") and owner_alive(rec.get("owner_pid"), rec.get("owner_start"))


def _kill_and_wait(store, runtime: str, cid: str, timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout` s; returns once the runtime says it stopped."""
    st = runtime_state(store, runtime, cid)
    if st is None or st.get("status") not in ("running", "created", "paused"):
        return
    _rt(store, runtime, "kill", cid, "TERM", check=False)
    deadline = time.monotonic() + timeout
    killed = False
    while True:
        st = runtime_state(store, runtime, cid)
        if st is None or st.get("status") == "stopped":
            return
        if not killed and time.monotonic() >= deadline:
            _rt(store, runtime, "kill", cid, "KILL", check=False)
            killed = True
        time.sleep(0.05)


def _wait_owner_done(cdir: str, timeout: float = 30.0) -> dict | None:
    """After stopping an attached container: wait for its flatmount process to release it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = read_record(cdir)
        if rec is None or rec.get("released") or not _owned(rec):
            return rec
        time.sleep(0.05)
    return read_record(cdir)


def stop(store, cid: str, timeout: float = 10.0) -> Container:
    """SIGTERM the container's process, SIGKILL after `timeout` s, then release its mount (and
    remove it if it was started with --rm).  An attached container is released by its own
    flatmount process, which sees its exit."""
    cdir, rec = _record_of(store, cid)
    runtime = rec.get("runtime", "runc")
    _kill_and_wait(store, runtime, cid, timeout)
    if _owned(rec):
        rec = _wait_owner_done(cdir) or rec
    elif not rec.get("released"):
        _finish(store, cid, cdir, runtime, keep_record=not rec.get("rm"))
    return Container(cid, rec.get("image", ""), "exited", rec.get("exit_status"), None, rec.get("created"),
                     bool(rec.get("detached")), rec.get("owner_pid"), cdir)


def remove(store, cid: str, force: bool = False) -> str:
    """Remove a stopped container (`force`: kill it first)."""
    cdir, rec = _record_of(store, cid)
    runtime = rec.get("runtime", "runc")
    if not rec.get("released"):
        st = runtime_state(store, runtime, cid)
        running = st is not None and st.get("status") in ("running", "created", "paused")
        if (running or _owned(rec)) and not force:
            raise BundleError(f"container {cid} is running: `flatmount stop {cid}` first, or rm --force")
        if force:
            _kill_and_wait(store, runtime, cid, 0)
            if _owned(rec):
                rec = _wait_owner_done(cdir)
                if rec is None:
                    return cid   # it was started with --rm: its process removed it
    _finish(store, cid, cdir, runtime, keep_record=False)
    return cid


def _remove_new_dir(cdir: str, name: str, removed: list[str]) -> None:
    """A container dir its creator never renamed into place: removed once that creator is gone."""
    parts = name[len(NEW_PREFIX):].split("-", 2)
    try:
        pid, start = int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return
    if owner_alive(pid, start):
        return
    for entry in os.listdir(cdir):
        if entry == RECORD or entry.startswith(".tmp-"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(cdir, entry))
    with contextlib.suppress(OSError):
        os.rmdir(cdir)
        removed.append(name)


def cleanup_containers(store) -> list[str]:
    """Remove containers whose flatmount process died (kill -9 included) and are not running
    detached: their process, runtime state, mount, lease and directory.  Returns their ids."""
    removed = []
    base = containers_dir(store)
    if not _containers_dir_exists(store):
        return []
    names = sorted(os.listdir(base))
    for cid in names:
        cdir = os.path.join(base, cid)
        if os.path.islink(cdir) or not os.path.isdir(cdir):
            continue
        if cid.startswith(NEW_PREFIX):
            _remove_new_dir(cdir, cid, removed)
            continue
        rec = read_record(cdir)
        if rec is None:
            # dirs appear with their record (renamed into place), so this is one whose removal was
            # cut short after its record went: only temp files can be left in it
            remove_record_temps(cdir)
            with contextlib.suppress(OSError):
                os.rmdir(cdir)
                removed.append(cid)
            continue
        if rec.get("released") or not valid_id(cid):
            continue   # a stopped container's record (`rm` removes it), or not ours
        runtime = rec.get("runtime", "runc")
        if rec.get("detached"):
            st = runtime_state(store, runtime, cid)
            if st is not None and st.get("status") in ("running", "paused", "created"):
                continue
            _finish(store, cid, cdir, runtime, keep_record=not rec.get("rm"))
            removed.append(cid)
            continue
        if owner_alive(rec.get("owner_pid"), rec.get("owner_start")):
            continue
        st = runtime_state(store, runtime, cid)
        if st is not None and st.get("status") in ("running", "paused", "created"):
            _rt(store, runtime, "kill", cid, "KILL", check=False)
        _finish(store, cid, cdir, runtime, keep_record=False)
        removed.append(cid)
    return removed
