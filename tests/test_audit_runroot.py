"""Audit of issue 13 item 7 against the new runtime dirs: `<runroot>/containers`, `<runroot>/runc`,
`<runroot>/pull-partial` are internal paths like `<runroot>/mounts`: a symlink there is refused,
never followed (run wrote records and runc state through it; a registry pull's prune unlinked week-old
files in whatever `pull-partial` pointed at).  Real store, real runc, real registry.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest
from conftest import ROOT, require_root, require_tool

from flatmount.api import open_store
from flatmount.errors import StoreError
from flatmount.pull import pull
from flatmount.sources.registry import RegistryOptions
from tests.test_registry import layer_tars, seed

BUSYBOX = "/bin/busybox" if os.path.isfile("/bin/busybox") else "/usr/bin/busybox"


def _cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flatmount", "--root", str(tmp_path / "store"),
                           "--runroot", str(tmp_path / "run"), *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT))


@pytest.mark.parametrize("name", ["containers", "runc"])
def test_run_refuses_a_symlinked_runtime_dir(tmp_path, name):
    require_root()
    require_tool("runc")
    r = _cli(tmp_path, "pull", f"oci:{ROOT}/flatmount/examples/demo-oci:demo", "--name", "demo")
    assert r.returncode == 0, r.stderr
    run = ["run", "--rm", "-v", f"{BUSYBOX}:/bin/busybox:ro", "demo", "--", "/bin/busybox", "true"]
    assert _cli(tmp_path, *run).returncode == 0     # makes the runroot and its dirs
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "run" / name).rename(tmp_path / f"{name}.real")
    os.symlink(target, tmp_path / "run" / name)
    r = _cli(tmp_path, *run)
    assert r.returncode == 3 and r.stderr.count("\n") == 1, r.stderr
    assert "StoreError" in r.stderr and "symbolic link" in r.stderr, r.stderr
    assert os.listdir(target) == []
    if name == "containers":
        for cmd in (["ps", "-a"], ["cleanup"]):
            r = _cli(tmp_path, *cmd)
            assert r.returncode == 3 and "symbolic link" in r.stderr, (cmd, r.stderr)
    with open("/proc/self/mountinfo") as f:
        assert not [line for line in f if str(tmp_path) in line]


def test_registry_pull_refuses_a_symlinked_pull_partial(registry, tmp_path):
    require_root()
    info = seed(registry, tmp_path, "lib/partial", layer_tars(1, "pp"), ["gzip"])
    assert info
    victim = tmp_path / "victim"
    victim.mkdir()
    old = victim / "old-file"
    old.write_text("a week old, still wanted\n")
    week = time.time() - 8 * 86400
    os.utime(old, (week, week))
    run = tmp_path / "store-run"
    run.mkdir(mode=0o700)
    os.symlink(victim, run / "pull-partial")
    with open_store(tmp_path / "store", runroot=run, config=os.devnull) as s:
        with pytest.raises(StoreError, match="symbolic link"):
            pull(s, f"docker://{registry.host}/lib/partial:v1", registry=RegistryOptions(tls_verify=False))
    assert old.read_text() == "a week old, still wanted\n"


@pytest.mark.parametrize("kind", ["symlink", "device", "fifo"])
def test_digestfile_writes_only_new_or_regular_files(registry, tmp_path, kind):
    """Item 9 for `pull --digestfile`: it was renamed over whatever the path was (a device node
    became a regular file, a symlink was replaced); now refused before anything is fetched."""
    require_root()
    seed(registry, tmp_path, "lib/digest", layer_tars(1, "df"), ["gzip"])
    out = tmp_path / "digest"
    keep = tmp_path / "keep"
    keep.write_text("target\n")
    if kind == "symlink":
        os.symlink(keep, out)
    elif kind == "device":
        os.mknod(out, 0o600 | stat.S_IFCHR, os.makedev(1, 3))   # a /dev/null of our own
    else:
        os.mkfifo(out)
    before = os.lstat(out)
    r = subprocess.run([sys.executable, "-m", "flatmount", "--root", str(tmp_path / "store"), "--runroot",
                        str(tmp_path / "run"), "pull", "--tls-verify=false", "--digestfile", str(out),
                        f"docker://{registry.host}/lib/digest:v1"], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT))
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "OutputError" in r.stderr, r.stderr
    after = os.lstat(out)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert keep.read_text() == "target\n"
    ok = tmp_path / "new-digest"
    r = subprocess.run([sys.executable, "-m", "flatmount", "--root", str(tmp_path / "store"), "--runroot",
                        str(tmp_path / "run"), "pull", "--tls-verify=false", "--digestfile", str(ok),
                        f"docker://{registry.host}/lib/digest:v1"], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    assert ok.read_text().startswith("sha256:")
