"""Audit of issue 13 (bad input) against `flatmount run`/`bundle`: hostile image configs and users.

The image config is untrusted input: wrong JSON types, NULs, relative or huge paths must give one
clear RunSpecError line (exit 3) before anything reaches the runtime, and leave nothing mounted.  An
image's /etc/passwd that is a symlink (to the host's /etc/shadow) or a FIFO is never followed, never
blocks.  Real images (busybox layer, OCI layout), real store, the CLI in a subprocess.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile

import pytest
from conftest import ROOT, require_root, require_tool

from flatmount.api import open_store
from tools.busybox_image import layer_tar, write_oci

HOSTILE = {
    "config-list": ["x"],
    "entrypoint-int": {"Entrypoint": 5},
    "entrypoint-ints": {"Entrypoint": [1, 2]},
    "cmd-nul": {"Cmd": ["echo", "a\0b"]},
    "env-int": {"Env": [5], "Cmd": ["true"]},
    "env-nul": {"Env": ["A=B\0C"], "Cmd": ["true"]},
    "env-noname": {"Env": ["=x"], "Cmd": ["true"]},
    "user-int": {"User": 1000, "Cmd": ["true"]},
    "workdir-int": {"WorkingDir": 5, "Cmd": ["true"]},
    "workdir-relative": {"WorkingDir": "../../etc", "Cmd": ["true"]},
    "workdir-1mb": {"WorkingDir": "/" + "a" * (1 << 20), "Cmd": ["true"]},
    "labels-list": {"Labels": ["a"], "Cmd": ["true"]},
}


def _tar_with_passwd(kind: str) -> bytes:
    """The busybox rootfs whose /etc/passwd is a symlink to the host's /etc/shadow, or a FIFO."""
    src = tarfile.open(fileobj=io.BytesIO(layer_tar()))
    buf = io.BytesIO()
    out = tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT)
    for ti in src.getmembers():
        if ti.name == "etc/passwd":
            ti = tarfile.TarInfo("etc/passwd")
            ti.mtime = 1_700_000_000
            if kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/shadow"
            elif kind == "devlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, "../../dev/zero"
            else:
                ti.type = tarfile.FIFOTYPE
            out.addfile(ti)
        else:
            out.addfile(ti, src.extractfile(ti) if ti.isreg() else None)
    out.close()
    return buf.getvalue()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    require_root()
    require_tool("runc")
    base = tmp_path_factory.mktemp("auditrun")
    paths = {"root": str(base / "store"), "runroot": str(base / "run"), "base": str(base)}
    with open_store(paths["root"], runroot=paths["runroot"]) as store:
        for name, cfg in HOSTILE.items():
            store.pull(write_oci(base / "oci", name, cfg), name)
        for kind in ("symlink", "fifo", "devlink"):
            store.pull(write_oci(base / "oci", f"passwd-{kind}", {"Cmd": ["/bin/id"]},
                                 tar=_tar_with_passwd(kind)), f"passwd-{kind}")
    try:
        yield paths
    finally:
        left = _our_mounts(str(base))
        for m in reversed(left):
            subprocess.run(["umount", "-l", m], check=False)
        assert not left, f"mounts left behind: {left}"


def _our_mounts(prefix: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split(" ")[4] for line in f if line.split(" ")[4].startswith(prefix)]


def cli(paths, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flatmount", "--root", paths["root"], "--runroot",
                           paths["runroot"], *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT))


def _assert_clean(paths) -> None:
    assert _our_mounts(paths["base"]) == []
    with open_store(paths["root"], runroot=paths["runroot"]) as store:
        assert store.mounts() == []


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_image_config_is_one_clear_error(env, name):
    r = cli(env, "run", "--rm", name)
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and "RunSpecError: the image config's" in r.stderr, r.stderr
    assert "internal error" not in r.stderr and "runc" not in r.stderr
    _assert_clean(env)


def test_hostile_field_overridden_on_the_command_line_runs(env):
    """Only what is used is checked: -w / -u / a command replace the bad fields."""
    r = cli(env, "run", "--rm", "-w", "/", "workdir-int", "--", "/bin/pwd")
    assert (r.returncode, r.stdout) == (0, "/\n"), r.stderr
    r = cli(env, "run", "--rm", "-u", "0", "user-int", "--", "/bin/id", "-u")
    assert (r.returncode, r.stdout) == (0, "0\n"), r.stderr
    r = cli(env, "run", "--rm", "cmd-nul", "--", "/bin/echo", "ok")
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr
    _assert_clean(env)


@pytest.mark.parametrize("user", ["\u00b2", "1000:\u00b2", "99999999999", "0:99999999999", "4294967295"])
def test_bad_user_option_is_one_clear_error(env, user):
    """Unicode digits (str.isdigit() but not int()) and ids beyond uid_t: a RunSpecError, not an
    internal error or a spec runc cannot parse."""
    r = cli(env, "run", "--rm", "-u", user, "passwd-symlink")
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and "RunSpecError" in r.stderr, r.stderr
    _assert_clean(env)


def test_image_passwd_symlink_is_not_followed_to_the_host(env):
    """A named user cannot be resolved through an /etc/passwd that is a symlink (the host's shadow
    is never read); the link resolves inside the image (absent there), so numeric users still run."""
    r = cli(env, "run", "--rm", "-u", "root", "passwd-symlink")
    assert r.returncode == 3 and "user 'root' is not in the image's /etc/passwd" in r.stderr, r.stderr
    r = cli(env, "run", "--rm", "-u", "0", "passwd-symlink", "--", "/bin/id", "-u")
    assert (r.returncode, r.stdout) == (0, "0\n"), r.stderr
    _assert_clean(env)


@pytest.mark.parametrize("kind", ["fifo", "devlink"])
def test_image_passwd_fifo_or_device_is_refused_not_blocking(env, kind):
    """runc reads the container's /etc/passwd itself (even for a numeric user): a FIFO blocked
    `run` forever in runc init, a link to /dev/zero feeds it endless bytes.  Refused up front."""
    for user in ("0", "root"):
        r = cli(env, "run", "--rm", "-u", user, f"passwd-{kind}", "--", "/bin/true")
        assert r.returncode == 3, (r.stdout, r.stderr)
        assert "RunSpecError: the image's /etc/passwd is" in r.stderr and r.stderr.count("\n") == 1
    _assert_clean(env)


@pytest.mark.parametrize("hostname", ["a\n1.2.3.4 forged.example", "-x", "a" * 65, "a b", ""])
def test_bad_hostname_is_refused(env, hostname):
    """--hostname goes into the container's /etc/hosts: a newline forged extra host entries."""
    r = cli(env, "run", "--rm", f"--hostname={hostname}", "-w", "/", "workdir-int", "--", "/bin/cat",
            "/etc/hosts")
    assert r.returncode == 3 and "RunSpecError: bad hostname" in r.stderr, (r.stdout, r.stderr)
    assert "forged" not in r.stdout
    _assert_clean(env)


def test_good_hostname_is_the_containers(env):
    r = cli(env, "run", "--rm", "--hostname", "web-1.example", "-w", "/", "workdir-int", "--", "/bin/hostname")
    assert (r.returncode, r.stdout) == (0, "web-1.example\n"), r.stderr


def test_nul_in_api_options_is_a_runspec_error():
    from flatmount.run.runspec import RunOptions, RunSpecError

    for kw in ({"env": ("A=b\0c",)}, {"command": ("echo", "a\0b")}, {"user": "0\0"},
               {"tmpfs": ("/x\0",)}, {"workdir": "/a\0b"}):
        with pytest.raises(RunSpecError, match="NUL"):
            RunOptions(**kw)


@pytest.mark.parametrize("mode", ["none", "loopback"])
def test_net_hook_never_changes_flatmounts_own_namespace(mode):
    """`net-hook MODE` takes the container's pid from stdin: given a pid of flatmount's own network
    namespace, `none` took that namespace's lo down (the host's).  Run inside a throwaway network
    namespace, so that even a regression only touches that one."""
    require_root()
    require_tool("unshare")
    require_tool("ip")
    script = (f"ip link set lo {'down' if mode == 'loopback' else 'up'}; sleep 30 & "
              f"echo '{{\"pid\": '$!'}}' | {sys.executable} -m flatmount net-hook {mode}; echo rc=$?; "
              "ip -o link show lo; kill $!")
    r = subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT))
    assert "rc=3" in r.stdout and "NetworkError" in r.stderr and "own network namespace" in r.stderr, \
        (r.stdout, r.stderr)
    flags = r.stdout.split("<", 1)[1].split(">", 1)[0].split(",")
    assert ("UP" in flags) == (mode == "none"), r.stdout


@pytest.mark.parametrize("state", ["[" * 100_000, "garbage", "[]", '{"pid": "x"}', ""])
def test_net_hook_bad_state_is_one_clear_error(state):
    r = subprocess.run([sys.executable, "-m", "flatmount", "net-hook", "none"], input=state,
                       capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       cwd=str(ROOT))
    assert r.returncode == 3 and r.stderr.count("\n") == 1, r.stderr
    assert "expected the runtime's state JSON" in r.stderr, r.stderr
