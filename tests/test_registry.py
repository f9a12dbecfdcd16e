"""pull docker:// (and oci-archive:, docker-archive:) through skopeo's image proxy, against a real registry.

The registry is Debian's docker-registry on 127.0.0.1 (tests/registry_fixtures.py), seeded with
`skopeo copy` from OCI layouts the tests build.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flatmount.api import open_store
from flatmount.errors import RegistryError
from flatmount.pull import pull
from flatmount.sources.registry import RegistryOptions
from flatmount.store.batch import host_architecture
from tests.registry_fixtures import Registry
from tests.tarbuild import Tar, check_consistent, make_oci, store_state

ROOT = Path(__file__).resolve().parent.parent
PLAIN = RegistryOptions(tls_verify=False)


def new_store(tmp_path, name="store", additional=()):
    return open_store(tmp_path / name, runroot=tmp_path / f"{name}-run", config=os.devnull,
                      additional=list(additional))


def layer_tars(n: int, seed: str, *, files: int = 3, size: int = 3000) -> list[bytes]:
    out = []
    for i in range(n):
        t = Tar(root=(i == 0), root_mtime=5)
        t.dir(f"d{i}/", mtime=7)
        for k in range(files):
            data = hashlib.sha256(f"{seed}-{i}-{k}".encode()).digest() * (size // 32)
            t.file(f"d{i}/f{k}", data, mtime=9)
        t.file(f"d{i}/small", f"{seed}{i}".encode())
        out.append(t.bytes())
    return out


def seed(reg: Registry, tmp_path: Path, repo: str, tars: list[bytes], kinds: list[str], tag: str = "v1") -> dict:
    layout = tmp_path / f"oci-{repo.replace('/', '_')}-{tag}"
    info = make_oci(layout, list(zip(tars, kinds, strict=True)), tag=tag)
    reg.push(layout, tag, repo)
    return info


def flat_bytes(store, ref: str) -> bytes:
    return Path(store.flatten(ref).path).read_bytes()


def test_docker_pull_same_image_as_oci(registry, tmp_path):
    tars = layer_tars(3, "same")
    info = seed(registry, tmp_path, "lib/same", tars, ["gzip", "zstd", "gzip"])
    with new_store(tmp_path, "a") as a, new_store(tmp_path, "b") as b:
        ra = pull(a, f"docker://{registry.host}/lib/same:v1", registry=PLAIN)
        rb = pull(b, f"oci:{info['path']}:v1")
        assert ra.image.id == rb.image.id == info["config"].split(":")[1]
        assert ra.image.names == (f"{registry.host}/lib/same:v1",)
        assert len(ra.imported) == 3 and ra.present == ()
        chain = a.layer_chain(ra.image.top_layer)
        assert [r.diff_id for r in chain] == info["diff_ids"]
        assert [r.compressed_digest for r in chain] == [d["digest"] for d in info["layers"]]
        fa, fb = flat_bytes(a, ra.image.id), flat_bytes(b, rb.image.id)
        assert fa == fb
        check_consistent(a.root)
        assert os.listdir(a.root / "tmp") == []
    assert not (tmp_path / "a-run" / "pull-partial").exists()


def test_second_image_fetches_only_new_layers(registry, tmp_path):
    tars = layer_tars(4, "share")
    base = seed(registry, tmp_path, "app/base", tars[:2], ["gzip", "gzip"])
    full = seed(registry, tmp_path, "app/full", tars, ["gzip", "gzip", "zstd", "gzip"])
    with new_store(tmp_path) as s:
        r1 = pull(s, f"docker://{registry.host}/app/base:v1", registry=PLAIN)
        assert len(r1.imported) == 2
        before = len(registry.blob_gets("app/full"))
        r2 = pull(s, f"docker://{registry.host}/app/full:v1", registry=PLAIN)
        gets = registry.blob_gets("app/full")[before:]
        assert sorted(gets) == sorted([full["config"], full["layers"][2]["digest"], full["layers"][3]["digest"]])
        assert r2.present == r1.imported and len(r2.imported) == 2
        assert base["layers"][0]["digest"] not in gets
        # and again: everything present, only the config is fetched
        n = len(registry.blob_gets("app/full"))
        r3 = pull(s, f"docker://{registry.host}/app/full:v1", registry=PLAIN, events=(ev := []).append)
        assert registry.blob_gets("app/full")[n:] == [full["config"]]
        assert r3.imported == () and len(r3.present) == 4
        assert [e["status"] for e in ev if e["event"] == "layer"] == ["present"] * 4


def test_base_layers_in_additional_store_are_not_fetched(registry, tmp_path):
    tars = layer_tars(3, "ais")
    seed(registry, tmp_path, "ais/base", tars[:2], ["gzip", "zstd"])
    full = seed(registry, tmp_path, "ais/full", tars, ["gzip", "zstd", "gzip"])
    with new_store(tmp_path, "ro") as ro:
        pull(ro, f"docker://{registry.host}/ais/base:v1", registry=PLAIN)
    ro_state = store_state(tmp_path / "ro")
    with new_store(tmp_path, "rw", additional=[tmp_path / "ro"]) as s:
        n = len(registry.blob_gets("ais/full"))
        r = pull(s, f"docker://{registry.host}/ais/full:v1", registry=PLAIN)
        assert registry.blob_gets("ais/full")[n:] == [full["config"]] + [full["layers"][2]["digest"]]
        assert len(r.present) == 2 and len(r.imported) == 1
        with new_store(tmp_path, "oci") as o:
            ro_ = pull(o, f"oci:{full['path']}:v1")
            assert flat_bytes(s, r.image.id) == flat_bytes(o, ro_.image.id)
    assert store_state(tmp_path / "ro") == ro_state


def test_many_layers_fetched_concurrently_and_digestfile(registry, tmp_path):
    """While layer 0's blob hangs, the other layers are fetched by the other jobs; at most 3 at once."""
    import threading

    from tests.registry_fixtures import FaultServer

    tars = layer_tars(6, "jobs", files=4, size=200_000)
    info = seed(registry, tmp_path, "jobs/six", tars, ["gzip"] * 6)
    fault = FaultServer(registry, stall={info["layers"][0]["digest"]})
    ev: list[dict] = []
    digestfile = tmp_path / "digest"
    out: dict = {}
    try:
        with new_store(tmp_path) as s:
            def run() -> None:
                try:
                    out["result"] = pull(s, f"docker://{fault.host}/jobs/six:v1", events=ev.append,
                                         registry=RegistryOptions(tls_verify=False, jobs=3,
                                                                  digestfile=str(digestfile)))
                except BaseException as e:  # noqa: BLE001 - checked below
                    out["error"] = e

            t = threading.Thread(target=run)
            t.start()
            try:
                assert fault.stalled.wait(60)
                deadline = time.monotonic() + 60
                others = {d["digest"] for d in info["layers"][1:]}
                while time.monotonic() < deadline:
                    done = {e["digest"] for e in ev if e["event"] == "layer" and e["status"] == "done"}
                    if done >= others:
                        break
                    time.sleep(0.02)
                assert done == others, "the other layers were not fetched while layer 0 hung"
            finally:
                fault.release()
                t.join(120)
            assert "error" not in out, out.get("error")
            r = out["result"]
            assert len(r.imported) == 6
            assert [x.diff_id for x in s.layer_chain(r.image.top_layer)] == info["diff_ids"]
    finally:
        fault.stop()
    running, peak = set(), 0
    for e in ev:
        if e["event"] == "layer" and e["status"] == "fetching":
            running.add(e["index"])
            peak = max(peak, len(running))
        elif e["event"] == "layer" and e["status"] == "done":
            running.discard(e["index"])
    assert 2 <= peak <= 3
    assert digestfile.read_text() == info["manifest"]


def _index_layout(tmp_path: Path, per_arch: dict[str, list[bytes]]) -> tuple[Path, dict[str, dict]]:
    """One OCI layout with an image index (tag `multi`) over one manifest per architecture."""
    layout = tmp_path / "oci-multi"
    infos = {}
    manifests = []
    for arch, tars in per_arch.items():
        sub = tmp_path / f"oci-{arch}"
        info = make_oci(sub, [(t, "gzip") for t in tars], tag=None)
        cfg = json.loads((sub / "blobs" / "sha256" / info["config"].split(":")[1]).read_bytes())
        cfg["architecture"] = arch
        cfg_bytes = json.dumps(cfg).encode()
        cdig = "sha256:" + hashlib.sha256(cfg_bytes).hexdigest()
        man = json.loads((sub / "blobs" / "sha256" / info["manifest"].split(":")[1]).read_bytes())
        man["config"] = {**man["config"], "digest": cdig, "size": len(cfg_bytes)}
        man_bytes = json.dumps(man).encode()
        mdig = "sha256:" + hashlib.sha256(man_bytes).hexdigest()
        blobs = layout / "blobs" / "sha256"
        blobs.mkdir(parents=True, exist_ok=True)
        for f in (sub / "blobs" / "sha256").iterdir():
            (blobs / f.name).write_bytes(f.read_bytes())
        (blobs / cdig.split(":")[1]).write_bytes(cfg_bytes)
        (blobs / mdig.split(":")[1]).write_bytes(man_bytes)
        manifests.append({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdig,
                          "size": len(man_bytes), "platform": {"os": "linux", "architecture": arch}})
        infos[arch] = {"config": cdig, "manifest": mdig}
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": manifests}).encode()
    idig = hashlib.sha256(index).hexdigest()
    (layout / "blobs" / "sha256" / idig).write_bytes(index)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": "sha256:" + idig,
         "size": len(index), "annotations": {"org.opencontainers.image.ref.name": "multi"}}]}))
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return layout, infos


def test_platform_picks_from_multi_arch_index(registry, tmp_path):
    host = host_architecture()
    other = "arm64" if host != "arm64" else "amd64"
    layout, infos = _index_layout(tmp_path, {host: layer_tars(2, "host"), other: layer_tars(1, "other")})
    registry.push(layout, "multi", "multi/img", all_images=True)
    with new_store(tmp_path) as s:
        r = pull(s, f"docker://{registry.host}/multi/img:multi", registry=PLAIN)
        assert "sha256:" + r.image.id == infos[host]["config"]
        r2 = pull(s, f"docker://{registry.host}/multi/img:multi",
                  registry=RegistryOptions(tls_verify=False, platform=f"linux/{other}"), name="other")
        assert "sha256:" + r2.image.id == infos[other]["config"]
        assert r2.image.config["architecture"] == other
        with pytest.raises(RegistryError, match="os/arch"):
            pull(s, f"docker://{registry.host}/multi/img:multi",
                 registry=RegistryOptions(tls_verify=False, platform="arm64"))


def test_tls_registry_with_cert_dir(tmp_path):
    reg = Registry(tmp_path / "tlsreg", tls=True)
    try:
        info = seed(reg, tmp_path, "tls/img", layer_tars(2, "tls"), ["gzip", "zstd"])
        with new_store(tmp_path) as s:
            before = store_state(s.root)
            with pytest.raises(RegistryError, match="cert-dir"):
                pull(s, f"docker://{reg.host}/tls/img:v1")  # self-signed: refused without its CA
            assert store_state(s.root) == before
            r = pull(s, f"docker://{reg.host}/tls/img:v1", registry=RegistryOptions(cert_dir=str(reg.cert_dir)))
            assert "sha256:" + r.image.id == info["config"]
    finally:
        reg.stop()


def test_htpasswd_registry_creds_and_authfile(tmp_path):
    reg = Registry(tmp_path / "authreg", user=("alice", "s3cret"))
    try:
        info = seed(reg, tmp_path, "auth/img", layer_tars(2, "auth"), ["gzip", "gzip"])
        with new_store(tmp_path) as s:
            before = store_state(s.root)
            for opts in (RegistryOptions(tls_verify=False),
                         RegistryOptions(tls_verify=False, creds="alice:wrong")):
                with pytest.raises(RegistryError, match="--creds") as e:
                    pull(s, f"docker://{reg.host}/auth/img:v1", registry=opts)
                assert "\n" not in str(e.value)
                assert store_state(s.root) == before
            r = pull(s, f"docker://{reg.host}/auth/img:v1",
                     registry=RegistryOptions(tls_verify=False, creds="alice:s3cret"))
            assert "sha256:" + r.image.id == info["config"]
            auth = tmp_path / "auth.json"
            import base64

            token = base64.b64encode(b"alice:s3cret").decode()
            auth.write_text(json.dumps({"auths": {reg.host: {"auth": token}}}))
            r2 = pull(s, f"docker://{reg.host}/auth/img:v1", name="again",
                      registry=RegistryOptions(tls_verify=False, authfile=str(auth)))
            assert r2.image.id == r.image.id
            # the CLI: --authfile via REGISTRY_AUTH_FILE, as skopeo and podman read it
            env = {**os.environ, "PYTHONPATH": str(ROOT), "REGISTRY_AUTH_FILE": str(auth)}
            p = subprocess.run([sys.executable, "-m", "flatmount", "pull", "--root", str(s.root),
                                "--runroot", str(tmp_path / "cli-run"), "--config", os.devnull,
                                "--tls-verify=false", "--name", "cli", f"docker://{reg.host}/auth/img:v1"],
                               env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
            assert p.returncode == 0, p.stderr
            assert p.stdout.strip() == r.image.id
            # no --authfile: skopeo's default search (containers-auth.json), here $XDG_RUNTIME_DIR's
            xdg = tmp_path / "xdg"
            (xdg / "containers").mkdir(parents=True)
            (xdg / "containers" / "auth.json").write_text(auth.read_text())
            env = {k: v for k, v in os.environ.items() if k != "REGISTRY_AUTH_FILE"}
            env.update(PYTHONPATH=str(ROOT), XDG_RUNTIME_DIR=str(xdg))
            p = subprocess.run([sys.executable, "-m", "flatmount", "pull", "--root", str(s.root),
                                "--runroot", str(tmp_path / "cli-run"), "--config", os.devnull,
                                "--tls-verify=false", "--name", "xdg", f"docker://{reg.host}/auth/img:v1"],
                               env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
            assert p.returncode == 0, p.stderr
    finally:
        reg.stop()


def test_oci_archive_and_docker_archive(tmp_path):
    tars = layer_tars(2, "arch")
    info = make_oci(tmp_path / "oci", [(tars[0], "gzip"), (tars[1], "none")], tag="v1")
    oci_tar = tmp_path / "img.tar"
    subprocess.run(["tar", "-C", str(tmp_path / "oci"), "-cf", str(oci_tar), "."], check=True)
    docker_tar = tmp_path / "docker.tar"
    subprocess.run(["skopeo", "copy", "-q", f"oci:{tmp_path / 'oci'}:v1", f"docker-archive:{docker_tar}:arch/img:v1"],
                   check=True, capture_output=True)
    index = (tmp_path / "oci" / "index.json").read_bytes()

    def unpacked_copies() -> list[str]:
        """Copies of our archive that skopeo unpacked into /var/tmp and left there."""
        out = []
        for e in os.listdir("/var/tmp"):
            with contextlib.suppress(OSError):
                if e.startswith("oci") and Path("/var/tmp", e, "index.json").read_bytes() == index:
                    out.append(e)
        return out

    with new_store(tmp_path) as s:
        before = set(unpacked_copies())
        r = pull(s, f"oci-archive:{oci_tar}:v1")
        assert set(unpacked_copies()) - before == set()  # the proxy closed the image: its copy is gone
        assert "sha256:" + r.image.id == info["config"]
        assert r.image.names == ("v1:latest",)
        r2 = pull(s, f"docker-archive:{docker_tar}")
        # docker-archive stores uncompressed layers: same diff_ids, so the same layers (present)
        assert [x.diff_id for x in s.layer_chain(r2.image.top_layer)] == info["diff_ids"]
        assert r2.imported == () and len(r2.present) == 2
        with new_store(tmp_path, "oci2") as o:
            ro = pull(o, f"oci:{tmp_path / 'oci'}:v1")
            assert flat_bytes(s, r.image.id) == flat_bytes(o, ro.image.id)
        with pytest.raises(RegistryError):
            pull(s, f"oci-archive:{tmp_path / 'missing.tar'}")


def test_cli_pull_docker_json_events(registry, tmp_path):
    tars = layer_tars(2, "cli")
    info = seed(registry, tmp_path, "cli/img", tars, ["gzip", "zstd"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "flatmount", "pull", "--root", str(tmp_path / "s"), "--runroot",
            str(tmp_path / "r"), "--config", os.devnull, "--tls-verify=false"]
    p = subprocess.run(base + ["--json", f"docker://{registry.host}/cli/img:v1"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["image"]["id"] == info["config"].split(":")[1]
    events = [json.loads(line) for line in p.stderr.splitlines()]
    assert events[0] == {"event": "manifest", "digest": info["manifest"]}
    done = [e for e in events if e["event"] == "layer" and e["status"] == "done"]
    assert sorted(e["digest"] for e in done) == sorted(d["digest"] for d in info["layers"])
    assert all(e["bytes"] == e["size"] for e in done)
    p = subprocess.run(base + ["--quiet", f"docker://{registry.host}/cli/img:v1"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stderr == "" and p.stdout.strip() == info["config"].split(":")[1]
    p = subprocess.run(base + [f"docker://{registry.host}/cli/nope:v1"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 3 and "Traceback" not in p.stderr
    assert p.stderr.startswith("flatmount: RegistryError:") and len(p.stderr.strip().splitlines()) == 1



def test_docker_schema2_image(registry, tmp_path):
    """A Docker v2s2 manifest reaches us converted to OCI (config too): same layers, same flat image."""
    tars = layer_tars(2, "v2s2")
    layout = tmp_path / "oci-v2s2"
    info = make_oci(layout, [(t, "gzip") for t in tars], tag="v1")
    registry.push(layout, "v1", "d/v2s2", fmt="v2s2")
    assert b"vnd.docker.distribution.manifest.v2" in registry.get("/v2/d/v2s2/manifests/v1")
    with new_store(tmp_path) as s, new_store(tmp_path, "o") as o:
        r = pull(s, f"docker://{registry.host}/d/v2s2:v1", registry=PLAIN)
        assert [x.diff_id for x in s.layer_chain(r.image.top_layer)] == info["diff_ids"]
        ro = pull(o, f"oci:{layout}:v1")
        assert flat_bytes(s, r.image.id) == flat_bytes(o, ro.image.id)


def test_short_names_resolved_by_registries_conf(registry, tmp_path, monkeypatch):
    from flatmount.sources.registry import SearchConfig, resolve_short_name

    info = seed(registry, tmp_path, "short/img", layer_tars(1, "short"), ["gzip"])
    conf = tmp_path / "registries.conf"
    conf.write_text(f'unqualified-search-registries = ["{registry.host}"]\n'
                    f'[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n'
                    f'[aliases]\n"nick" = "{registry.host}/short/img"\n')
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(conf))
    with new_store(tmp_path) as s:
        r = pull(s, "short/img:v1")  # insecure = true in registries.conf: skopeo reads the same file
        assert r.image.names == (f"{registry.host}/short/img:v1",)
        assert "sha256:" + r.image.id == info["config"]
        r2 = pull(s, "nick:v1")
        assert r2.image.id == r.image.id
        # a qualified bare reference needs no registries.conf
        r3 = pull(s, f"{registry.host}/short/img:v1", registry=PLAIN, name="q")
        assert r3.image.id == r.image.id
        # ambiguous without a terminal: an error listing the candidates, nothing pulled
        conf.write_text('unqualified-search-registries = ["a.example", "b.example"]\n')
        with pytest.raises(RegistryError, match="ambiguous.*a.example/short/img:v1, b.example/short/img:v1"):
            pull(s, "short/img:v1")
        conf.write_text("")
        with pytest.raises(RegistryError, match="no path here.*no unqualified-search-registries"):
            pull(s, "short/img")
    cfg = SearchConfig(("a.example", "b.example"), {}, "enforcing")
    assert resolve_short_name("x", config=cfg, tty=True, ask=lambda _q: "2") == ["docker://b.example/x:latest"]
    assert resolve_short_name("x@sha256:" + "0" * 64, config=SearchConfig(("r.io",), {}, "enforcing")) == \
        ["docker://r.io/x@sha256:" + "0" * 64]
    permissive = SearchConfig(("a.example", "b.example"), {}, "permissive")
    assert resolve_short_name("x:1", config=permissive, tty=False) == \
        ["docker://a.example/x:1", "docker://b.example/x:1"]


def test_terminal_progress_per_layer(registry, tmp_path):
    """On a terminal (a real pty): a line per layer with size and rate, skipped layers said so."""
    import pty

    tars = layer_tars(3, "tty", files=4, size=300_000)
    seed(registry, tmp_path, "tty/base", tars[:1], ["gzip"])
    full = seed(registry, tmp_path, "tty/full", tars, ["gzip", "gzip", "zstd"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "flatmount", "pull", "--root", str(tmp_path / "s"), "--runroot",
            str(tmp_path / "r"), "--config", os.devnull, "--tls-verify=false"]
    subprocess.run(base + ["-q", f"docker://{registry.host}/tty/base:v1"], env=env, cwd=ROOT, check=True,
                   capture_output=True, timeout=120)
    master, slave = pty.openpty()
    try:
        p = subprocess.run(base + [f"docker://{registry.host}/tty/full:v1"], env=env, cwd=ROOT, stderr=slave,
                           stdout=subprocess.PIPE, text=True, timeout=120)
        os.close(slave)
        slave = -1
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert p.returncode == 0
    text = out.decode().replace("\x1b[K", "")
    assert f"layer 0 {full['layers'][0]['digest'][7:19]}: skipped, already present" in text
    for i in (1, 2):
        line = [x for x in text.replace("\r", "\n").splitlines()
                if x.strip().startswith(f"layer {i} {full['layers'][i]['digest'][7:19]}:")]
        assert line and re.search(r": [0-9.]+ [kM]?B in [0-9.]+ s \([0-9.]+ [kMG]?B/s\)$", line[0]), text


def test_pulled_image_mounts_and_reads(registry, tmp_path):
    """End to end: pull docker://, mount privately, read files of every layer, unmount."""
    from tests.conftest import require_root

    require_root()
    tars = layer_tars(3, "mnt", files=2, size=5000)
    seed(registry, tmp_path, "mnt/img", tars, ["gzip", "zstd", "gzip"])
    with new_store(tmp_path) as s:
        r = pull(s, f"docker://{registry.host}/mnt/img:v1", registry=PLAIN)
        with s.mount(r.image.names[0]) as merged:
            for i in range(3):
                data = hashlib.sha256(f"mnt-{i}-1".encode()).digest() * (5000 // 32)
                assert Path(merged, f"d{i}", "f1").read_bytes() == data
                assert Path(merged, f"d{i}", "small").read_bytes() == f"mnt{i}".encode()
        assert not os.path.ismount(merged)
