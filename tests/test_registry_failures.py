"""pull docker:// failures, injected for real: a registry down or killed mid-blob, a wrong blob, a
manifest that does not match its digest, Ctrl-C, kill -9 (the proxy is reaped); a re-pull resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flatmount.errors import FlatmountError, RegistryError
from flatmount.pull import pull
from flatmount.sources.registry import RegistryOptions
from tests.registry_fixtures import FaultServer, Registry
from tests.tarbuild import Tar, check_consistent, make_oci, store_state
from tests.test_registry import PLAIN, layer_tars, new_store

ROOT = Path(__file__).resolve().parent.parent


def big_tar(files: int = 64, seed: int = 1) -> bytes:
    t = Tar(root=False)
    t.dir("big/", mtime=3)
    for k in range(files):
        t.file(f"big/f{k:03d}", os.urandom(1 << 20), mtime=3)
    return t.bytes()


def without_objects(root: Path) -> dict:
    """The store's state, object files aside (a failed pull may leave unreferenced ones for gc)."""
    st = store_state(root)
    st["files"] = {k: v for k, v in st["files"].items() if not k.startswith("objects/")}
    return st


def children(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out += [int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            pass
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_registry_down(registry, tmp_path):
    layout = tmp_path / "oci"
    make_oci(layout, [(t, "gzip") for t in layer_tars(1, "down")], tag="v1")
    registry.push(layout, "v1", "down/img")
    registry.stop()
    with new_store(tmp_path) as s:
        before = store_state(s.root)
        with pytest.raises(RegistryError, match="registry up") as e:
            pull(s, f"docker://{registry.host}/down/img:v1", registry=PLAIN)
        assert "\n" not in str(e.value)
        assert store_state(s.root) == before


def test_registry_killed_mid_blob_then_repull_resumes(registry, tmp_path):
    tars = layer_tars(2, "mid") + [big_tar()]
    layout = tmp_path / "oci"
    info = make_oci(layout, [(tars[0], "gzip"), (tars[1], "zstd"), (tars[2], "zstd")], tag="v1")
    registry.push(layout, "v1", "mid/img")
    big = info["layers"][2]["digest"]
    events: list[dict] = []

    def on_event(e: dict) -> None:
        events.append(e)
        if e["event"] == "progress" and e["digest"] == big and registry.proc is not None:
            done = {x["index"] for x in events if x["event"] == "layer" and x["status"] == "done"}
            if done >= {0, 1}:  # the small layers completed: now cut the big one off
                registry.proc.kill()
                registry.proc.wait()
                registry.proc = None

    with new_store(tmp_path) as s:
        s.ensure_writable(), s.connect()
        before = without_objects(s.root)
        with pytest.raises(RegistryError) as e:
            pull(s, f"docker://{registry.host}/mid/img:v1", events=on_event, registry=PLAIN)
        assert "\n" not in str(e.value)
        assert registry.proc is None, "the registry was not killed mid-blob (the test did not test)"
        assert not any(x["event"] == "layer" and x["status"] == "done" and x["index"] == 2 for x in events)
        assert without_objects(s.root) == before  # nothing recorded
        check_consistent(s.root)
        registry.start()
        n = len(registry.blob_gets("mid/img"))
        ev2: list[dict] = []
        r = pull(s, f"docker://{registry.host}/mid/img:v1", events=ev2.append, registry=PLAIN)
        assert registry.blob_gets("mid/img")[n:] == [info["config"], big]  # the completed layers: kept
        assert sorted(x["index"] for x in ev2 if x["event"] == "layer" and x["status"] == "resumed") == [0, 1]
        assert len(r.imported) == 3
        with new_store(tmp_path, "o") as o:
            ro = pull(o, f"oci:{layout}:v1")
            assert Path(s.flatten(r.image.id).path).read_bytes() == Path(o.flatten(ro.image.id).path).read_bytes()
        check_consistent(s.root)
    assert not (tmp_path / "store-run" / "pull-partial").exists()


def test_wrong_blob_and_tampered_manifest(registry, tmp_path):
    layout = tmp_path / "oci"
    info = make_oci(layout, [(t, k) for t, k in zip(layer_tars(2, "bad"), ["gzip", "zstd"], strict=True)],
                    tag="v1")
    registry.push(layout, "v1", "bad/img")
    for corrupt in (info["layers"][1]["digest"], info["config"]):
        fault = FaultServer(registry, corrupt={corrupt})
        try:
            with new_store(tmp_path) as s:
                s.ensure_writable(), s.connect()
                before = without_objects(s.root)
                with pytest.raises(FlatmountError, match="(?i)digest|corrupt") as e:
                    pull(s, f"docker://{fault.host}/bad/img:v1", registry=PLAIN)
                assert "\n" not in str(e.value)
                assert without_objects(s.root) == before
                assert any(corrupt in p for p in fault.requests)
        finally:
            fault.stop()
    fault = FaultServer(registry, tamper_manifests=True)
    try:
        with new_store(tmp_path) as s:
            before = store_state(s.root)
            with pytest.raises(RegistryError, match="(?i)digest") as e:
                pull(s, f"docker://{fault.host}/bad/img@{info['manifest']}", registry=PLAIN)
            assert store_state(s.root) == before
    finally:
        fault.stop()


def _interruptible() -> None:
    """In the child: SIGINT as at a terminal, even when this test run was started with it ignored
    (a background job of a non-interactive shell): Python then turns it into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_stalled_pull(registry: Registry, tmp_path: Path):
    tars = layer_tars(2, "stall")
    layout = tmp_path / "oci"
    info = make_oci(layout, [(tars[0], "gzip"), (tars[1], "gzip")], tag="v1")
    registry.push(layout, "v1", "stall/img")
    fault = FaultServer(registry, stall={info["layers"][1]["digest"]})
    store = tmp_path / "store"
    with new_store(tmp_path) as s:
        s.ensure_writable(), s.connect()
    before = store_state(store)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "flatmount", "pull", "--root", str(store), "--runroot",
                             str(tmp_path / "store-run"), "--config", os.devnull, "--tls-verify=false",
                             f"docker://{fault.host}/stall/img:v1"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_interruptible)
    assert fault.stalled.wait(60), "the pull never reached the stalled blob"
    kids = [k for k in children(proc.pid) if Path(f"/proc/{k}/comm").read_text().strip() == "skopeo"]
    assert kids, "no skopeo child found"
    # a session of their own: a terminal's Ctrl-C reaches flatmount only, which winds them down
    assert all(os.getsid(k) != os.getsid(proc.pid) for k in kids)
    return proc, fault, kids, before


def test_ctrl_c_is_a_clean_error(registry, tmp_path):
    proc, fault, kids, before = _start_stalled_pull(registry, tmp_path)
    try:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        fault.stop()
    assert proc.returncode == 3, err
    assert "interrupted" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not any(alive(k) for k in kids)
    assert without_objects(tmp_path / "store") == {**before, "files": {
        k: v for k, v in before["files"].items() if not k.startswith("objects/")}}


def test_proxy_dies_with_flatmount_on_kill_9(registry, tmp_path):
    proc, fault, kids, _ = _start_stalled_pull(registry, tmp_path)
    try:
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while any(alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(k) for k in kids), "skopeo outlived a killed flatmount"
    finally:
        for k in kids:
            if alive(k):
                os.kill(k, signal.SIGKILL)
        fault.stop()


def test_bad_environment_and_options_are_clean_errors(registry, tmp_path):
    layout = tmp_path / "oci"
    make_oci(layout, [(t, "gzip") for t in layer_tars(1, "env")], tag="v1")
    registry.push(layout, "v1", "env/img")
    ref = f"docker://{registry.host}/env/img:v1"
    with new_store(tmp_path) as s:
        with pytest.raises(RegistryError, match="skopeo is not installed"):
            pull(s, ref, registry=RegistryOptions(tls_verify=False, skopeo=str(tmp_path / "no-skopeo")))
        with pytest.raises(RegistryError, match="--jobs"):
            pull(s, ref, registry=RegistryOptions(tls_verify=False, jobs=0))
        with pytest.raises(RegistryError, match="--authfile .*no such file"):
            pull(s, ref, registry=RegistryOptions(tls_verify=False, authfile=str(tmp_path / "none.json")))
        with pytest.raises(RegistryError, match="--cert-dir .*no such directory"):
            pull(s, ref, registry=RegistryOptions(cert_dir=str(tmp_path / "nodir")))
        with pytest.raises(RegistryError, match="manifest unknown"):
            pull(s, f"docker://{registry.host}/env/img:nope", registry=PLAIN)
        r = pull(s, ref, registry=RegistryOptions(tls_verify=False, jobs=1))
        assert len(r.imported) == 1


@pytest.mark.parametrize("message, hint", [
    ('pinging container registry 127.0.0.1:40105: Get "https://127.0.0.1:40105/v2/": x509: certificate '
     'signed by unknown authority', "--cert-dir"),
    ("reading manifest v1 in 127.0.0.1:5000/a: unauthorized: authentication required", "--creds"),
    ("received unexpected HTTP status: 401 Unauthorized", "--creds"),
    ("Get https://h:401/v2/: dial tcp 127.0.0.1:401: connect: connection refused", "registry up"),
    ("fetching blob sha256:401ab: x509: certificate has expired", "--cert-dir"),
])
def test_error_hints_follow_the_cause_not_digits_of_an_address(message, hint):
    """The hint names the cause's remedy; a port such as 40105 is no HTTP 401."""
    from flatmount.sources.registry import _clean_error

    out = _clean_error(message, "docker://h/img:v1")
    assert out.startswith("docker://h/img:v1: ") and hint in out
