"""`pull` options for registries and skopeo transports, and its progress display / JSON events.

Spelled as skopeo and podman spell them, so a command line carries over.  Kept apart from
commands/store.py so the registry part of `pull` lives in one place.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: CLI start-up, see objects/lazy.py)

if TYPE_CHECKING:  # pragma: no cover
    from typing import Any

    from flatmount.sources.registry import RegistryOptions


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {value!r}")


def add_registry_options(p: argparse.ArgumentParser) -> None:
    """The registry options of `pull` (they apply to docker://, archives and skopeo's other transports)."""
    g = p.add_argument_group("registries and skopeo transports")
    g.add_argument("--authfile", help="auth.json (default: $REGISTRY_AUTH_FILE, then containers-auth.json's "
                                      "search order, as skopeo does)")
    g.add_argument("--creds", metavar="USER[:PASSWORD]", help="credentials for the registry")
    g.add_argument("--tls-verify", type=_bool, nargs="?", const=True, default=None, metavar="BOOL",
                   help="require HTTPS and verify certificates (default: registries.conf, else true)")
    g.add_argument("--cert-dir", metavar="PATH", help="certificates (*.crt, *.cert, *.key) for the registry")
    g.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="the image of a multi-arch index to pull (default: this machine)")
    g.add_argument("--digestfile", metavar="PATH", help="write the pulled manifest's digest to PATH")
    g.add_argument("--jobs", type=int, default=3, metavar="N", help="layers fetched at once (default 3)")
    # as `podman pull -q`; also before the subcommand (`flatmount -q pull`): no default here, so the
    # subcommand's namespace never overwrites the global one
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress output")


def registry_options(args: argparse.Namespace) -> RegistryOptions:
    from flatmount.sources.registry import RegistryOptions

    authfile = args.authfile or os.environ.get("REGISTRY_AUTH_FILE") or None
    return RegistryOptions(authfile=authfile, creds=args.creds, tls_verify=args.tls_verify,
                           cert_dir=args.cert_dir, platform=args.platform, jobs=args.jobs,
                           digestfile=args.digestfile)


def registry_events(args: argparse.Namespace) -> Any:
    """JSON lines on stderr with --json, a progress display on a terminal, else nothing."""
    if getattr(args, "json", False):
        return JsonEvents(sys.stderr)
    if getattr(args, "quiet", False) or not sys.stderr.isatty():
        return None
    return TerminalEvents(sys.stderr)


class JsonEvents:
    """One JSON object per line per event (progress at most 5 times a second per layer)."""

    def __init__(self, stream: Any):
        self.stream = stream
        self._lock = threading.Lock()
        self._last: dict[int, float] = {}

    def __call__(self, event: dict) -> None:
        now = time.monotonic()
        if event.get("event") == "progress":
            i = event.get("index", -1)
            if now - self._last.get(i, 0.0) < 0.2:
                return
            self._last[i] = now
        import json  # here: this module is imported while every command's parser is built

        with self._lock:
            self.stream.write(json.dumps(event, sort_keys=True) + "\n")
            self.stream.flush()

    def done(self) -> None:
        pass


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} GB"


class TerminalEvents:
    """One line per layer: skipped (present), fetching with bytes and rate, done."""

    def __init__(self, stream: Any):
        self.stream = stream
        self._lock = threading.Lock()
        self._active: dict[int, tuple[int, int, float]] = {}  # index -> (bytes, size, start)
        self._last = 0.0
        self._drawn = False

    def _line(self, text: str) -> None:
        self.stream.write("\r\x1b[K" + text + "\n")
        self._drawn = False

    def __call__(self, event: dict) -> None:
        with self._lock:
            kind, i = event.get("event"), event.get("index", -1)
            digest = str(event.get("digest", ""))[7:19]
            now = time.monotonic()
            if kind == "layer":
                status = event.get("status")
                if status == "present":
                    self._line(f"layer {i} {digest}: skipped, already present")
                elif status == "resumed":
                    self._line(f"layer {i} {digest}: kept from an interrupted pull")
                elif status == "fetching":
                    self._active[i] = (0, int(event.get("size") or 0), now)
                elif status == "done":
                    _, size, start = self._active.pop(i, (0, 0, now))
                    secs = max(now - start, 1e-6)
                    self._line(f"layer {i} {digest}: {_human(size)} in {secs:.2f} s ({_human(size / secs)}/s)")
            elif kind == "progress" and i in self._active:
                _, size, start = self._active[i]
                self._active[i] = (int(event.get("bytes") or 0), size, start)
                if now - self._last < 0.2:
                    return
            else:
                return
            self._last = now
            parts = []
            for j, (n, size, start) in sorted(self._active.items()):
                rate = n / max(now - start, 1e-6)
                parts.append(f"layer {j}: {_human(n)}/{_human(size)} {_human(rate)}/s")
            self.stream.write("\r\x1b[K" + "; ".join(parts))
            self.stream.flush()
            self._drawn = bool(parts)

    def done(self) -> None:
        with self._lock:
            if self._drawn:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
