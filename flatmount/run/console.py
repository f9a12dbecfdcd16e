"""`run -t`: the container's pseudo-terminal, received from the runtime over its console socket.

With `process.terminal`, runc (and crun) create the pty inside the container and send its master
end over a unix socket given by `--console-socket` (SCM_RIGHTS).  flatmount relays between its own
stdio and that master until the container's side is closed, with its own terminal in raw mode (the
container's line discipline does the echoing and line editing) and its window size copied.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading

from flatmount.errors import FlatmountError


class ConsoleError(FlatmountError):
    """The runtime did not hand over the container's terminal."""


class ConsoleSocket:
    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.bind(path)
        self.sock.listen(1)
        self.master: int | None = None
        self._thread: threading.Thread | None = None
        self._saved_tty = None
        self._stop_r, self._stop_w = os.pipe()

    def receive(self, timeout: float = 10.0, stdout: int | None = None) -> int:
        """The pty master the runtime sent (it connected during `create`), already given the size
        of our terminal: the container's first command may ask for it as soon as it starts."""
        self.sock.settimeout(timeout)
        try:
            conn, _ = self.sock.accept()
        except TimeoutError:
            raise ConsoleError("the runtime did not send the container's terminal") from None
        with conn:
            _msg, fds, _flags, _addr = socket.recv_fds(conn, 4096, 1)
        if not fds:
            raise ConsoleError("the runtime connected to the console socket but sent no terminal")
        self.master = fds[0]
        os.set_inheritable(self.master, False)
        self._fout = sys.stdout.fileno() if stdout is None else stdout
        self.copy_window_size()
        return self.master

    def relay_start(self, stdin: int | None = None, stdout: int | None = None) -> None:
        """Copy stdin to the terminal and the terminal to stdout on a thread, until it closes."""
        import termios
        import tty

        fin = sys.stdin.fileno() if stdin is None else stdin
        fout = sys.stdout.fileno() if stdout is None else stdout
        if self.master is None:
            raise ConsoleError("no terminal received")
        self._fout = fout
        if os.isatty(fin):
            self._saved_tty = (fin, termios.tcgetattr(fin))
            tty.setraw(fin, termios.TCSANOW)   # TCSAFLUSH would drop typed-ahead input
        self._thread = threading.Thread(target=self._relay, args=(fin, fout), name="flatmount-tty",
                                        daemon=True)
        self._thread.start()

    def copy_window_size(self) -> None:
        """Our terminal's rows and columns onto the container's (at start and on SIGWINCH)."""
        import fcntl
        import termios

        fout = getattr(self, "_fout", None)
        if self.master is None or fout is None or not os.isatty(fout):
            return
        with contextlib.suppress(OSError):
            size = fcntl.ioctl(fout, termios.TIOCGWINSZ, b"\0" * 8)
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, size)

    def _relay(self, fin: int, fout: int) -> None:
        import select
        import signal

        # signals for flatmount (forwarded ones, SIGWINCH) must reach the main thread, whose
        # waitpid they interrupt so that their handlers run now, not after the container ended
        signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP})
        master = self.master
        watch = [master, self._stop_r, fin]
        while True:
            try:
                ready, _, _ = select.select(watch, [], [])
            except InterruptedError:
                continue
            if master in ready:
                try:
                    data = os.read(master, 65536)
                except OSError:      # EIO: the container's side is closed
                    data = b""
                if not data:
                    return
                _write_all(fout, data)
            if fin in ready:
                try:
                    data = os.read(fin, 65536)
                except OSError:
                    data = b""
                if data:
                    _write_all(master, data)
                else:
                    watch.remove(fin)    # stdin ended: keep relaying output
            if self._stop_r in ready and master not in ready:
                return

    def relay_stop(self, drain_s: float = 2.0) -> None:
        """After the container's process exited: let the relay drain its output, then stop it."""
        if self._thread is not None:
            self._thread.join(drain_s)
            os.write(self._stop_w, b"x")
            self._thread.join(1.0)
        self._restore()

    def _restore(self) -> None:
        if self._saved_tty is not None:
            import termios

            fd, attrs = self._saved_tty
            with contextlib.suppress(OSError):
                termios.tcsetattr(fd, termios.TCSADRAIN, attrs)
            self._saved_tty = None

    def close(self) -> None:
        self._restore()
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        for fd in (self.master, self._stop_r, self._stop_w):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.master = None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        except OSError:
            return
        view = view[n:]
