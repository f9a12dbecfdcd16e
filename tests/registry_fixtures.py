"""A real registry for tests: Debian's `docker-registry` (the reference distribution registry) on 127.0.0.1.

`Registry(tmp, tls=..., htpasswd=...)` starts it on a free port with its own storage dir and stops it
in `stop()` (the fixtures call it in a finalizer).  Its access log is its stderr/stdout, written to a
file: `blob_gets(repo)` counts the blob GETs in it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.conftest import require_tool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    def __init__(self, tmp: Path, *, tls: bool = False, user: tuple[str, str] | None = None):
        self.exe = require_tool("docker-registry")
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.tls = tls
        self.user = user
        self.cert_dir: Path | None = None
        self.log = self.tmp / "registry.log"
        self.data = self.tmp / "data"
        self.proc: subprocess.Popen | None = None
        conf = ["version: 0.1", "log:", "  level: info", "  accesslog:", "    disabled: false",
                "storage:", "  filesystem:", f"    rootdirectory: {self.data}",
                "http:", f"  addr: {self.host}"]
        if tls:
            require_tool("openssl")
            self.cert_dir = self.tmp / "certs"
            self.cert_dir.mkdir()
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                            "-keyout", str(self.tmp / "key.pem"), "-out", str(self.cert_dir / "ca.crt")],
                           check=True, capture_output=True)
            conf += ["  tls:", f"    certificate: {self.cert_dir / 'ca.crt'}", f"    key: {self.tmp / 'key.pem'}"]
        if user:
            require_tool("htpasswd")
            line = subprocess.run(["htpasswd", "-Bbn", user[0], user[1]], check=True, capture_output=True,
                                  text=True).stdout.strip()
            (self.tmp / "htpasswd").write_text(line + "\n")
            conf += ["auth:", "  htpasswd:", "    realm: test", f"    path: {self.tmp / 'htpasswd'}"]
        (self.tmp / "config.yml").write_text("\n".join(conf) + "\n")
        self.start()

    def start(self) -> None:
        logf = open(self.log, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen([self.exe, "serve", str(self.tmp / "config.yml")], stdout=logf,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        logf.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("docker-registry did not start")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def push(self, oci_dir: str | os.PathLike, tag: str, repo: str, ref: str | None = None,
             fmt: str | None = None, all_images: bool = False) -> None:
        """`skopeo copy oci:DIR:TAG docker://HOST/REPO:REF` (the OCI layout built by the test)."""
        cmd = ["skopeo", "copy", "-q", "--dest-tls-verify=false" if not self.tls else
               f"--dest-cert-dir={self.cert_dir}"]
        if self.user:
            cmd.append(f"--dest-creds={self.user[0]}:{self.user[1]}")
        if fmt:
            cmd += ["--format", fmt]
        if all_images:
            cmd.append("--all")
        cmd += [f"oci:{oci_dir}:{tag}", f"docker://{self.host}/{repo}:{ref or tag}"]
        subprocess.run(cmd, check=True, capture_output=True)

    def blob_gets(self, repo: str) -> list[str]:
        """Digests of the blob GETs of `repo` in the access log (successful ones)."""
        text = self.log.read_text(errors="replace")
        return re.findall(rf'"GET /v2/{re.escape(repo)}/blobs/(sha256:[0-9a-f]{{64}}) HTTP/[0-9.]+" (?:200|307)',
                          text)

    def url(self, path: str) -> str:
        return f"http{'s' if self.tls else ''}://{self.host}{path}"

    def get(self, path: str, accept: str = "application/vnd.docker.distribution.manifest.v2+json, "
                                           "application/vnd.oci.image.manifest.v1+json") -> bytes:
        req = urllib.request.Request(self.url(path), headers={"Accept": accept})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read()


class FaultServer:
    """A small HTTP server of the test's own in front of a Registry, serving it with faults injected.

    `corrupt`: blob digests served with one byte flipped; `stall`: blob digests whose GET hangs (until
    `release()`, then served, or stop); `tamper_manifests`: manifests fetched by digest are served re-serialized
    (so they no longer match the digest asked for).  `requests` lists the paths asked for.
    """

    def __init__(self, upstream: Registry, *, corrupt: set[str] = frozenset(), stall: set[str] = frozenset(),
                 tamper_manifests: bool = False):
        import http.server
        import threading

        self.upstream = upstream
        self.corrupt, self.stall, self.tamper = set(corrupt), set(stall), tamper_manifests
        self.requests: list[str] = []
        self.stalled = threading.Event()
        self._release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_HEAD(self):
                self._serve(head=True)

            def do_GET(self):
                self._serve(head=False)

            def _serve(self, head: bool):
                import http.client

                server.requests.append(self.path)
                digest = self.path.rsplit("/", 1)[-1]
                if "/blobs/" in self.path and digest in server.stall and not head:
                    server.stalled.set()
                    if not server._release.wait(60):
                        self.close_connection = True
                        return  # (released: served as usual)
                conn = http.client.HTTPConnection("127.0.0.1", upstream.port, timeout=30)
                headers = {k: ", ".join(self.headers.get_all(k) or []) for k in ("Accept", "Authorization")
                           if self.headers.get(k)}
                conn.request("HEAD" if head else "GET", self.path, headers=headers)
                r = conn.getresponse()
                body = r.read()
                conn.close()
                if "/blobs/" in self.path and digest in server.corrupt and body:
                    body = body[:-1] + bytes([body[-1] ^ 1])
                if "/manifests/sha256:" in self.path and server.tamper and body:
                    body = body + b"\n"
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() in ("content-type", "www-authenticate", "location"):
                        self.send_header(k, v)
                    elif k.lower() == "docker-content-digest" and not server.tamper:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body) if not head else r.getheader(
                    "Content-Length") or 0))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._release.set()

    def stop(self) -> None:
        self._release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
