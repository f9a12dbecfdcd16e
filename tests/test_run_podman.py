"""Containers and podman: an image built with podman (`podman import` of the busybox rootfs, with its
config set by --change) pulled from c/storage and run by flatmount; and a flattened image run by
podman itself with `podman run --rootfs "$(flatmount mount IMAGE)":O` (podman's overlay-on-rootfs mode:
its writes go to an upper dir of its own, the flattened image stays read-only and unchanged).

podman runs with runc here (`--runtime runc`): crun 1.8 refuses this machine's hybrid cgroup layout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, require_root, require_tool
from cstorage_fixtures import cleanup_mounts, write_containers_conf, write_storage_conf

from tools.busybox_image import layer_tar


@pytest.fixture(scope="module")
def pm(tmp_path_factory):
    require_root()
    require_tool("podman")
    require_tool("runc")
    base = tmp_path_factory.mktemp("podrun")
    (base / "storage.conf").parent.mkdir(exist_ok=True)
    write_storage_conf(base / "storage.conf", base / "graph", base / "prun")
    write_containers_conf(base / "containers.conf", base)
    env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(base / "storage.conf"),
           "CONTAINERS_CONF": str(base / "containers.conf"), "PYTHONPATH": str(ROOT)}
    paths = {"base": base, "env": env, "root": str(base / "fstore"), "runroot": str(base / "frun")}
    try:
        yield paths
    finally:
        subprocess.run(["podman", "--runtime", "runc", "rm", "--all", "--force"], env=env, capture_output=True)
        subprocess.run(["podman", "image", "umount", "--all"], env=env, capture_output=True)
        cleanup_mounts(base)


def fm(pm, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flatmount", "--root", pm["root"], "--runroot", pm["runroot"],
                           *args], capture_output=True, text=True, env=pm["env"], cwd=str(ROOT), timeout=120,
                          **kw)


def podman(pm, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", "--runtime", "runc", *args], env=pm["env"], input=stdin,
                          capture_output=True, timeout=120)


def test_podman_built_image_runs_under_flatmount(pm):
    changes = ['CMD ["sh", "-c", "echo $GREETING in $(pwd) as $(id -un); exit 42"]', "ENV GREETING=imported",
               "WORKDIR /srv", "USER app", "LABEL org.example.built=podman"]
    args = ["import"]
    for c in changes:
        args += ["--change", c]
    r = podman(pm, *args, "-", "localhost/bbimp:latest", stdin=layer_tar())
    assert r.returncode == 0, r.stderr
    graph = pm["base"] / "graph"
    r = fm(pm, "pull", f"containers-storage:[{graph}]localhost/bbimp:latest", "--name", "bbimp")
    assert r.returncode == 0, r.stderr
    r = fm(pm, "run", "--rm", "bbimp")
    assert r.returncode == 42, r.stderr
    assert r.stdout == "imported in /srv as app\n"
    r = fm(pm, "run", "--rm", "-u", "root", "-w", "/", "-e", "GREETING=over", "bbimp")
    assert (r.returncode, r.stdout) == (42, "over in / as root\n")
    d = pm["base"] / "bundle"
    assert fm(pm, "bundle", "bbimp", str(d)).returncode == 0
    try:
        spec = json.loads((d / "config.json").read_text())
        assert spec["annotations"]["org.example.built"] == "podman"
    finally:
        assert fm(pm, "bundle", "--remove", str(d)).returncode == 0
    # the same image run by podman from its own store gives the same answer
    r = podman(pm, "run", "--rm", "--network", "none", "localhost/bbimp:latest")
    assert (r.returncode, r.stdout) == (42, b"imported in /srv as app\n"), r.stderr


def test_podman_runs_a_flattened_image_with_rootfs_overlay(pm):
    from tools.busybox_image import write_oci

    r = fm(pm, "pull", write_oci(pm["base"] / "oci", "bb"), "--name", "bb")
    assert r.returncode == 0, r.stderr
    r = fm(pm, "mount", "bb")
    assert r.returncode == 0, r.stderr
    merged = r.stdout.strip()
    try:
        before = sorted(os.listdir(merged))
        r = podman(pm, "run", "--rm", "--network", "none", "--rootfs", f"{merged}:O", "sh", "-c",
                   "echo scratch > /written && cat /written; head -1 /etc/passwd; exit 6")
        assert r.returncode == 6, r.stderr
        assert r.stdout == b"scratch\nroot:x:0:0:root:/root:/bin/sh\n"
        assert sorted(os.listdir(merged)) == before and not Path(merged, "written").exists()
        # podman left no mount on or below the flattened image's dir
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        assert points.count(merged) == 1
        assert not [p for p in points if p.startswith(merged + "/")]
    finally:
        r = fm(pm, "umount", merged)
    assert r.returncode == 0, r.stderr
    assert json.loads(fm(pm, "--json", "mounts").stdout) == []
