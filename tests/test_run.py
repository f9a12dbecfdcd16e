"""Containers on runc: `flatmount bundle` / `run` end to end, with real mounts, runc and namespaces.

Images: busybox-static (apt) packed as one layer into an OCI layout (tools/busybox_image.py), with an
image config setting Cmd, Env, WorkingDir, User and Labels; and the example image (no shell of its
own: busybox is bind-mounted as /bin/sh, and its missing mount points come from the stub overlay).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, cli_modules, require_root, require_tool
from hypothesis import given, settings
from hypothesis import strategies as st

from flatmount.api import open_store
from tools.busybox_image import write_oci

CONFIG = {"Cmd": ["sh", "-c", "echo $GREETING from $(pwd) as $(id -u):$(id -g) $(id -G)"],
          "Env": ["PATH=/bin", "GREETING=hello"], "WorkingDir": "/srv", "User": "app",
          "Labels": {"org.example.kind": "busybox"}}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A store with `bb` (busybox + CONFIG) and `demo` (the example image); checks on the way out
    that nothing of ours is left mounted or leased."""
    require_root()
    require_tool("runc")
    base = tmp_path_factory.mktemp("run")
    paths = {"root": str(base / "store"), "runroot": str(base / "run"), "base": str(base)}
    with open_store(paths["root"], runroot=paths["runroot"]) as store:
        store.pull(write_oci(base / "oci", "bb", CONFIG), "bb")
        store.pull(f"oci:{ROOT}/flatmount/examples/demo-oci:demo", "demo")
    try:
        yield paths
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            cli(paths, "cleanup")   # what a failed test left (its flatmount process is gone)
        leftovers = _our_mounts(str(base))
        for m in reversed(leftovers):
            subprocess.run(["umount", "-l", m], check=False)
        for rt in ("runc", "crun"):
            root = os.path.join(paths["runroot"], rt)
            if os.path.isdir(root):
                out = subprocess.run([rt, "--root", root, "list", "-q"], capture_output=True, text=True)
                for cid in out.stdout.split():
                    subprocess.run([rt, "--root", root, "delete", "--force", cid], check=False)
        assert not leftovers, f"mounts left behind: {leftovers}"


@pytest.fixture(autouse=True)
def _leftovers_fail_only_their_test(request):
    """After each test of the store: what it left behind (a hung or failed run's mounts, runc state)
    is removed here and reported as this test's error, so the tests after it start clean."""
    yield
    if "env" not in request.fixturenames:
        return
    paths = request.getfixturevalue("env")
    cdir = os.path.join(paths["runroot"], "containers")
    rroot = os.path.join(paths["runroot"], "runc")
    # (a test's own bundles and rootfs mounts live in its tmp_path, outside the store's base)
    own = request.node.funcargs.get("tmp_path")  # (its value: the fixture is torn down by now)
    prefixes = (paths["base"], *((str(own) + "/",) if own is not None else ()))

    def left() -> list[str]:
        found = _our_mounts(*prefixes)
        if os.path.isdir(cdir):
            found += [os.path.join(cdir, n) for n in os.listdir(cdir)]
        if os.path.isdir(rroot):
            found += [os.path.join(rroot, n) for n in os.listdir(rroot)]
        return found

    before = left()
    if not before:
        return
    with contextlib.suppress(subprocess.SubprocessError):
        cli(paths, "cleanup")
    if os.path.isdir(rroot):
        out = subprocess.run(["runc", "--root", rroot, "list", "-q"], capture_output=True, text=True)
        for cid in out.stdout.split():
            subprocess.run(["runc", "--root", rroot, "delete", "--force", cid], capture_output=True)
    for m in reversed(_our_mounts(*prefixes)):
        subprocess.run(["umount", "-l", m], check=False)
    with contextlib.suppress(subprocess.SubprocessError):
        cli(paths, "cleanup")   # the leases of what was unmounted by force
    pytest.fail(f"left behind: {before}; still there after a forced cleanup: {left()}")


def _our_mounts(*prefixes: str) -> list[str]:
    """Mount points below any of `prefixes`, in mountinfo order (a mount after the one it covers)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split(" ")[4]
            if mp.startswith(prefixes):
                out.append(mp)
    return out


def cli(paths, *args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "flatmount", "--root", paths["root"], "--runroot",
                           paths["runroot"], *args], capture_output=True, text=True, timeout=timeout,
                          env=e, cwd=str(ROOT), **kw)


def assert_nothing_left(paths) -> None:
    """No mount, lease, runc state or container dir of ours remains."""
    assert _our_mounts(paths["base"]) == []
    with open_store(paths["root"], runroot=paths["runroot"]) as store:
        assert store.mounts() == []
    cdir = os.path.join(paths["runroot"], "containers")
    assert not os.path.isdir(cdir) or os.listdir(cdir) == []
    rroot = os.path.join(paths["runroot"], "runc")
    if os.path.isdir(rroot):
        listed = subprocess.run(["runc", "--root", rroot, "list", "-q"], capture_output=True, text=True)
        assert listed.stdout.split() == []
        assert os.listdir(rroot) == []


# --- bundle ---------------------------------------------------------------------------------------

def test_bundle_config_json_and_runc_run_unchanged(env, tmp_path):
    """`flatmount bundle` writes a config.json that runc runs as is, with podman's confinement."""
    d = tmp_path / "b"
    r = cli(env, "bundle", "bb", str(d), "--net", "none", "-e", "EXTRA=1", "--", "sh", "-c",
            "grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status; exit 5")
    assert r.returncode == 0, r.stderr
    try:
        _check_bundle(env, d, tmp_path)
    finally:
        if d.exists():
            cli(env, "bundle", "--remove", str(d))
    assert_nothing_left(env)


def _check_bundle(env, d: Path, tmp_path: Path) -> None:
    spec = json.loads((d / "config.json").read_text())
    with open_store(env["root"], runroot=env["runroot"]) as store:
        [lease] = store.mounts()
    assert spec["root"] == {"path": lease.merged, "readonly": True}
    assert spec["process"]["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [10]}
    assert spec["process"]["cwd"] == "/srv"
    assert "EXTRA=1" in spec["process"]["env"] and "GREETING=hello" in spec["process"]["env"]
    assert spec["process"]["noNewPrivileges"] is True
    caps = spec["process"]["capabilities"]
    assert caps["bounding"] == caps["effective"] == caps["permitted"]
    assert set(caps["bounding"]) == {"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
                                     "CAP_NET_BIND_SERVICE", "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP",
                                     "CAP_SETUID", "CAP_SYS_CHROOT"}
    sec = spec["linux"]["seccomp"]
    assert sec["defaultAction"] == "SCMP_ACT_ERRNO" and sec["architectures"][0] == "SCMP_ARCH_X86_64"
    allowed = {n for s in sec["syscalls"] if s["action"] == "SCMP_ACT_ALLOW" for n in s["names"]}
    assert {"read", "execve", "arch_prctl"} <= allowed
    assert "chroot" in allowed                # included for CAP_SYS_CHROOT, which podman gives
    assert "bpf" not in allowed               # only with CAP_SYS_ADMIN, which podman does not give
    assert any("bpf" in s["names"] and s["action"] == "SCMP_ACT_ERRNO" for s in sec["syscalls"])
    assert "/proc/kcore" in spec["linux"]["maskedPaths"] and "/proc/sys" in spec["linux"]["readonlyPaths"]
    assert spec["annotations"] == {"org.example.kind": "busybox"}
    dests = {m["destination"]: m for m in spec["mounts"]}
    for p in ("/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/tmp", "/run"):
        assert p in dests
    assert "ro" in dests["/sys"]["options"]
    for n in ("hostname", "hosts", "resolv.conf"):
        m = dests[f"/etc/{n}"]
        assert m["source"] == str(d / n) and "ro" in m["options"] and (d / n).is_file()
    # runc runs the bundle unchanged
    runc_root = tmp_path / "runc"
    p = subprocess.run(["runc", "--root", str(runc_root), "run", "-b", str(d), "bundletest"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 5, p.stderr
    status = dict(line.split(":\t") for line in p.stdout.splitlines())
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    assert status["CapEff"] == "0000000000000000"   # a non-root user keeps no effective caps
    r = cli(env, "bundle", "--remove", str(d))
    assert r.returncode == 0, r.stderr
    assert not d.exists()


def test_bundle_context_manager_and_root_caps(env, tmp_path):
    """store.bundle() as a context manager; root in the container has exactly podman's caps."""
    from flatmount.run.runspec import RunOptions

    with open_store(env["root"], runroot=env["runroot"]) as store:
        with store.bundle("bb", str(tmp_path / "b"), RunOptions(user="0", command=(
                "sh", "-c", "grep ^CapBnd: /proc/self/status"))) as b:
            assert os.path.ismount(b.merged) and b.root == b.merged
            p = subprocess.run(["runc", "--root", str(tmp_path / "runc"), "run", "-b", b.dir, "ctx"],
                               capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
            assert p.returncode == 0, p.stderr
        assert not os.path.exists(b.dir) and store.mounts() == []
    # CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP NET_BIND_SERVICE SYS_CHROOT SETFCAP
    bits = sum(1 << n for n in (0, 1, 3, 4, 5, 6, 7, 8, 10, 18, 31))
    assert p.stdout.split()[1] == f"{bits:016x}"


def test_bundle_refuses_a_non_empty_dir_and_cleans_up_on_error(env, tmp_path):
    d = tmp_path / "b"
    d.mkdir()
    (d / "keep").write_text("mine")
    r = cli(env, "bundle", "bb", str(d))
    assert r.returncode == 3 and "not empty" in r.stderr and "Traceback" not in r.stderr
    assert (d / "keep").read_text() == "mine"
    r = cli(env, "bundle", "bb", str(tmp_path / "b2"), "-u", "nosuchuser")
    assert r.returncode == 3 and "nosuchuser" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "b2").exists()
    r = cli(env, "bundle", "--remove", str(d))
    assert r.returncode == 3 and "not a flatmount bundle" in r.stderr
    assert_nothing_left(env)


# --- run: exit status, signals, config and overrides ----------------------------------------------

@pytest.mark.parametrize("code", [0, 1, 42])
def test_exit_status_propagated(env, code):
    r = cli(env, "run", "--rm", "bb", "--", "sh", "-c", f"echo out; echo err >&2; exit {code}")
    assert r.returncode == code, r.stderr
    assert r.stdout == "out\n" and r.stderr == "err\n"
    assert_nothing_left(env)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="aZ09_.-/ \n\u00e9\u0661", max_size=70) | st.text(alphabet="ab.-", min_size=60, max_size=70)
       | st.text(alphabet="a1_.-", min_size=120, max_size=135))
def test_id_and_hostname_checks_are_their_patterns(name):
    """The container id and hostname checks (written without `re`, for start-up) accept exactly what
    their patterns do."""
    import re

    from flatmount.run.container import valid_id
    from flatmount.run.runspec import valid_hostname

    assert valid_id(name) == bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", name))
    assert valid_hostname(name) == bool(re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,62}[A-Za-z0-9])?", name))


def test_a_double_dash_in_the_command_is_the_commands(env):
    """Only the first `--` after IMAGE ends flatmount's options: a later one is passed to the command
    (it used to cut the command there and run what followed); options written after IMAGE still
    count up to the first `--`."""
    r = cli(env, "run", "--rm", "bb", "--", "sh", "-c", 'echo "[$*]"', "--", "a", "b")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "[a b]\n"
    r = cli(env, "run", "--rm", "bb", "-e", "X=1", "--", "sh", "-c", 'echo "$X[$*]"', "--", "-x")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "1[-x]\n"
    assert_nothing_left(env)


def test_a_container_start_imports_no_heavy_modules(env):
    """`run` (bundle, runc create/start, wait, clean up) needs json and subprocess, but not argparse
    (a plain `run` command line is parsed by flatmount.cli.fastparse), dataclasses (with inspect, ast
    and dis behind it: its records are flatmount.record classes), typing, pathlib or shutil: ~55 ms of
    a start in a new interpreter without site.  (tomllib is read once per runroot: the confinement
    cache.)"""
    for _ in range(2):   # (the first may read containers.conf and flatten the image)
        r, mods = cli_modules("--root", env["root"], "--runroot", env["runroot"], "run", "--rm", "bb", "--", "true")
        assert r.returncode == 0, r.stderr
        assert "flatmount.run.container" in mods and "json" in mods
        assert mods & {"argparse", "gettext", "dataclasses", "inspect", "ast", "typing", "pathlib", "shutil"} == set()
    assert "tomllib" not in mods
    assert_nothing_left(env)


def _popen_run(env, *args: str) -> subprocess.Popen:
    e = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "flatmount", "--root", env["root"], "--runroot",
                             env["runroot"], "run", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=e, cwd=str(ROOT), start_new_session=True)


def _state_of(pid: int) -> str:
    """What a hung process is doing: its Python stack (py-spy, if installed), or its kernel state,
    and the same for its children (runc, the container's init)."""
    import shutil

    lines = []
    if shutil.which("py-spy"):
        r = subprocess.run(["py-spy", "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30)
        lines.append(r.stdout + r.stderr)
    todo = [pid]
    while todo:
        q = todo.pop()
        try:
            cmd = Path(f"/proc/{q}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = {k: v.strip() for k, _, v in (ln.partition(":") for ln in
                      Path(f"/proc/{q}/status").read_text().splitlines())}
            wchan = Path(f"/proc/{q}/wchan").read_text()
            kids = Path(f"/proc/{q}/task/{q}/children").read_text().split()
        except OSError:
            continue
        lines.append(f"pid {q} [{status.get('State')}] wchan={wchan} SigCgt={status.get('SigCgt')}: {cmd}")
        todo += [int(k) for k in kids]
    return "\n".join(lines)


def _communicate(env, p: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """`p.communicate`, but a process that does not end in time is reported (its state), killed with
    its process group, and what it left is cleaned up, so that only this test fails."""
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        state = _state_of(p.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)   # flatmount and the runc it started
        p.wait()
        cli(env, "cleanup")   # its owner is gone: kills the container (which holds our pipes), unmounts
        try:
            p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.stdout.close()
            p.stderr.close()
        pytest.fail(f"flatmount run did not end within {timeout} s; its state was:\n{state}")


def _wait_file(path: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = Path(path).read_text()
            if text.strip():
                return text
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"{path} did not appear")


def test_killed_by_signal_is_128_plus_n(env):
    p = _popen_run(env, "--rm", "--name", "sigkill", "bb", "--", "sleep", "60")
    try:
        pid = int(_wait_file(os.path.join(env["runroot"], "containers", "sigkill", "init.pid")))
        time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
        _out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGKILL, err
    assert_nothing_left(env)


def test_sigterm_is_forwarded_to_the_container(env):
    script = "trap 'echo got TERM; exit 7' TERM; echo ready; while :; do sleep 0.05; done"
    p = _popen_run(env, "--rm", "--name", "fwd", "bb", "--", "sh", "-c", script)
    try:
        _wait_file(os.path.join(env["runroot"], "containers", "fwd", "init.pid"))
        assert p.stdout.readline() == "ready\n"
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 7, err
    assert out == "got TERM\n"
    assert_nothing_left(env)


def test_sigterm_before_the_containers_trap_is_delivered_once_it_is_set(env):
    """The container's init is pid 1 of its namespace: the kernel drops a signal it has no handler
    for yet (here: after exec, before `trap`).  flatmount sends it again once the handler exists,
    instead of waiting forever for a container that never heard of it (a CI hang)."""
    script = "echo ready; sleep 1; trap 'exit 9' TERM; while :; do sleep 0.05; done"
    p = _popen_run(env, "--rm", "--name", "latetrap", "bb", "--", "sh", "-c", script)
    assert p.stdout.readline() == "ready\n"
    p.send_signal(signal.SIGTERM)
    _out, err = _communicate(env, p, 30)
    assert p.returncode == 9, err
    assert_nothing_left(env)


def test_sigterm_a_container_ignores_ends_it_with_sigkill_after_the_grace(env):
    """A stop request is bounded: a container that never handles SIGTERM is killed after
    flatmount.run.container.STOP_TIMEOUT s (podman stop's 10 s) and `flatmount run` reports 128+9."""
    stop_timeout = 10   # flatmount.run.container.STOP_TIMEOUT
    p = _popen_run(env, "--rm", "--name", "deaf", "bb", "--", "sh", "-c", "echo ready; while :; do sleep 0.05; done")
    assert p.stdout.readline() == "ready\n"
    t = time.monotonic()
    p.send_signal(signal.SIGTERM)
    _out, err = _communicate(env, p, stop_timeout + 30)
    assert p.returncode == 128 + signal.SIGKILL, err
    assert stop_timeout - 0.5 <= time.monotonic() - t
    assert_nothing_left(env)


def test_env_workdir_user_from_config_and_options(env):
    r = cli(env, "run", "--rm", "bb")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello from /srv as 1000:1000 1000 10\n"
    r = cli(env, "run", "--rm", "-e", "GREETING=bye", "-w", "/tmp", "-u", "0:10", "bb")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "bye from /tmp as 0:10 10\n"
    r = cli(env, "run", "--rm", "-u", "nobody", "bb", "--", "sh", "-c", "id -un; echo $HOME")
    assert r.stdout == "nobody\n/nonexistent\n", r.stderr
    assert_nothing_left(env)


def test_root_is_read_only_tmp_and_run_writable(env):
    script = ("touch /new 2>&1; touch /bin/x 2>&1; echo a > /tmp/f && cat /tmp/f; "
              "echo b > /run/f && cat /run/f; echo c > /dev/shm/f && cat /dev/shm/f; "
              "grep ' / ' /proc/mounts | grep -c ' ro,'")
    r = cli(env, "run", "--rm", "-u", "0", "bb", "--", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "Read-only file system" in lines[0] and "Read-only file system" in lines[1]
    assert lines[2:] == ["a", "b", "c", "1"]
    assert_nothing_left(env)


def test_network_modes(env):
    probe = ("cat /sys/class/net/lo/flags; ls /sys/class/net | tr '\\n' ' '; echo; "
             "(echo pong | nc -l -p 7777 127.0.0.1 &); sleep 0.3; nc -w 2 127.0.0.1 7777 </dev/null")
    r = cli(env, "run", "--rm", "--net", "loopback", "bb", "--", "sh", "-c", probe)
    assert r.returncode == 0, r.stderr
    flags, names, pong = r.stdout.splitlines()
    assert int(flags, 16) & 1 and names.split() == ["lo"] and pong == "pong"
    r = cli(env, "run", "--rm", "bb", "--", "sh", "-c", "cat /sys/class/net/lo/flags")
    assert int(r.stdout, 16) & 1, "loopback is the default"
    r = cli(env, "run", "--rm", "--net", "none", "bb", "--", "sh", "-c",
            "cat /sys/class/net/lo/flags; ls /sys/class/net; nc -w 1 127.0.0.1 7777 </dev/null || echo refused")
    assert r.returncode == 0, r.stderr
    flags, *rest = r.stdout.splitlines()
    assert not int(flags, 16) & 1 and rest == ["lo", "refused"]
    r = cli(env, "run", "--rm", "--net", "host", "bb", "--", "ls", "/sys/class/net")
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.split()) == sorted(os.listdir("/sys/class/net"))
    assert len(r.stdout.split()) > 1
    assert_nothing_left(env)


def test_volumes_and_tmpfs(env, tmp_path):
    rw = tmp_path / "rw"
    rw.mkdir()
    (rw / "in").write_text("from host\n")
    ro = tmp_path / "ro"
    ro.mkdir()
    r = cli(env, "run", "--rm", "-u", "0", "-v", f"{rw}:/mnt", "-v", f"{ro}:/srv:ro", "--tmpfs", "/var",
            "bb", "--", "sh", "-c", "cat /mnt/in; echo back > /mnt/out; touch /srv/x 2>&1; "
                                    "echo v > /var/x && cat /var/x")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "from host" and "Read-only file system" in lines[1] and lines[2] == "v"
    assert (rw / "out").read_text() == "back\n"
    assert os.listdir(ro) == []
    r = cli(env, "run", "--rm", "-v", "relative:/x:zz", "bb")
    assert r.returncode == 3 and "Traceback" not in r.stderr
    assert_nothing_left(env)


def test_example_image_with_missing_mount_points(env):
    """The example image has no /proc, /dev, /tmp... and no shell: busybox comes in by -v, the mount
    points from the stub overlay; the image's own /etc files and attributes show through."""
    bb = "/bin/busybox"
    r = cli(env, "run", "--rm", "-v", f"{bb}:{bb}:ro", "demo", "--", bb, "sh", "-c",
            f"{bb} grep VERSION= /etc/os-release; echo $({bb} ls /opt/app); {bb} stat -c '%a %Y' /etc; "
            f"{bb} touch /etc/x 2>&1; exit 3")
    assert r.returncode == 3, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == 'VERSION="1.1"'
    with open_store(env["root"], runroot=env["runroot"]) as store, store.mount("demo") as merged:
        assert lines[1].split() == sorted(os.listdir(os.path.join(merged, "opt/app")))
        st = os.stat(os.path.join(merged, "etc"))
        assert lines[2] == f"{st.st_mode & 0o777:o} {int(st.st_mtime)}"
    assert "Read-only file system" in lines[3]
    r = cli(env, "run", "--rm", "demo")
    assert r.returncode != 0 and "Traceback" not in r.stderr   # /usr/bin/hello needs a /bin/sh
    assert_nothing_left(env)


def test_api_run_returns_status_and_timings(env):
    from flatmount.run.runspec import RunOptions

    with open_store(env["root"], runroot=env["runroot"]) as store:
        res = store.run("bb", RunOptions(command=("sh", "-c", "exit 9")), rm=True,
                        stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    assert res.exit_status == 9 and res.signal is None and not res.detached
    assert {"mount", "bundle", "create", "netlink", "start", "wait", "cleanup"} <= set(res.timings)
    assert_nothing_left(env)


def test_run_without_rm_keeps_a_record_until_rm(env):
    r = cli(env, "run", "--name", "keep", "bb", "--", "sh", "-c", "exit 4")
    assert r.returncode == 4
    assert _our_mounts(env["base"]) == []
    r = cli(env, "ps", "-a")
    assert "keep" in r.stdout and "exited (4)" in r.stdout
    assert "keep" not in cli(env, "ps").stdout
    r = cli(env, "rm", "keep")
    assert r.returncode == 0, r.stderr
    assert_nothing_left(env)


# --- detached containers, terminals, crashes, many at once -----------------------------------------

def test_detach_ps_stop_rm(env):
    r = cli(env, "run", "-d", "--name", "det", "bb", "--", "sh", "-c", "echo started; exec sleep 60")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "det\n"
    ps = json.loads(cli(env, "--json", "ps").stdout)
    assert [(c["id"], c["status"], c["detached"]) for c in ps] == [("det", "running", True)]
    with open_store(env["root"], runroot=env["runroot"]) as store:
        [lease] = store.mounts()
        assert lease.live and os.path.ismount(lease.merged)
    # a cleanup meanwhile keeps a running detached container and its lease
    r = cli(env, "cleanup")
    assert r.returncode == 0 and json.loads(cli(env, "--json", "ps").stdout)[0]["status"] == "running"
    r = cli(env, "rm", "det")
    assert r.returncode == 3 and "running" in r.stderr
    _wait_file(os.path.join(env["runroot"], "containers", "det", "ctr.log"))
    r = cli(env, "stop", "-t", "5", "det")
    assert r.returncode == 0, r.stderr
    assert _our_mounts(env["base"]) == []
    ps = json.loads(cli(env, "--json", "ps", "-a").stdout)
    assert [(c["id"], c["status"]) for c in ps] == [("det", "exited")]
    assert json.loads(cli(env, "--json", "ps").stdout) == []
    assert cli(env, "rm", "det").returncode == 0
    assert_nothing_left(env)
    # --rm with -d: gone once stopped; one that exits by itself is removed by cleanup
    assert cli(env, "run", "-d", "--rm", "--name", "det2", "bb", "--", "sleep", "60").returncode == 0
    assert cli(env, "stop", "-t", "1", "det2").returncode == 0
    assert_nothing_left(env)
    assert cli(env, "run", "-d", "--rm", "--name", "det3", "bb", "--", "true").returncode == 0
    deadline = time.monotonic() + 20
    while json.loads(cli(env, "--json", "ps").stdout) and time.monotonic() < deadline:
        time.sleep(0.1)
    r = cli(env, "cleanup")
    assert "det3" in r.stdout
    assert_nothing_left(env)


def test_terminal(env):
    """-t: the container's stdin/stdout are a terminal, typed input reaches it, its window size is
    ours from its first instruction on, and a SIGWINCH to flatmount passes a new size on."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    p = subprocess.Popen([sys.executable, "-m", "flatmount", "--root", env["root"], "--runroot", env["runroot"],
                          "run", "--rm", "-t", "bb", "--", "sh", "-c",
                          "stty size; tty; test -t 0 && echo isatty; read x; echo got $x; read y; stty size; exit 5"],
                         stdin=slave, stdout=slave, stderr=slave, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         cwd=str(ROOT))
    os.close(slave)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 30)
            if not ready:
                break
            try:
                data = os.read(master, 4096)
            except OSError:
                break
            if not data:
                break
            out += data
            if b"isatty\r\n" in out and b"typed" not in out:
                os.write(master, b"typed\r")
            if b"got typed\r\n" in out and b"go\r" not in out:
                fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 44, 120, 0, 0))
                p.send_signal(signal.SIGWINCH)
                time.sleep(0.3)
                os.write(master, b"go\r")
        try:
            assert p.wait(60) == 5
        except subprocess.TimeoutExpired:
            raise AssertionError(f"flatmount run -t did not end; the terminal showed {out!r}") from None
    finally:
        p.kill()
        os.close(master)
    assert out.splitlines() == [b"33 101", b"/dev/pts/0", b"isatty", b"typed", b"got typed", b"go", b"44 120"]
    assert_nothing_left(env)


def test_kill9_trials_then_cleanup_leaves_nothing(env):
    """50 `flatmount run` processes killed with SIGKILL at random points (mounting, bundling, in runc
    create, running, cleaning up); then `cleanup` removes every container, mount, lease, runc state."""
    import random

    rnd = random.Random(14)
    e = {**os.environ, "PYTHONPATH": str(ROOT)}
    for i in range(50):
        p = subprocess.Popen([sys.executable, "-m", "flatmount", "--root", env["root"], "--runroot",
                              env["runroot"], "run", "--rm", "--name", f"k{i}", "bb", "--", "sleep",
                              str(rnd.choice([0, 0.2, 5]))], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=e, cwd=str(ROOT))
        time.sleep(rnd.uniform(0.0, 0.6))
        p.kill()
        p.wait()
    time.sleep(1.0)   # runc processes the killed ones had started finish their step
    r = cli(env, "cleanup")
    assert r.returncode == 0, r.stderr
    assert_nothing_left(env)
    # the containers left running were killed: no `sleep` of ours survives
    out = subprocess.run(["pgrep", "-f", "^sleep 5$"], capture_output=True, text=True).stdout.split()
    for pid in out:
        with open(f"/proc/{pid}/cgroup") as f:
            assert "/k" not in f.read()


def test_20_containers_share_one_image_and_its_objects(env, tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    with open_store(env["root"], runroot=env["runroot"]) as store:
        flat = store.flatten("bb")
    images_before = sorted(os.listdir(os.path.join(env["root"], "images")))
    objects_before = sorted(os.listdir(os.path.join(env["root"], "objects")))
    procs = [_popen_run(env, "--rm", "--name", f"c{i}", "-v", f"{gate}:/gate:ro", "bb", "--", "sh", "-c",
                        "while [ ! -e /gate/go ]; do sleep 0.05; done; grep -c . /etc/passwd")
             for i in range(20)]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            running = [c for c in json.loads(cli(env, "--json", "ps").stdout) if c["status"] == "running"]
            if len(running) == 20:
                break
            time.sleep(0.2)
        assert len(running) == 20
        with open_store(env["root"], runroot=env["runroot"]) as store:
            leases = store.mounts()
        assert len(leases) == 20
        assert {lease.image_digest for lease in leases} == {flat.digest}
        assert len({lease.merged for lease in leases}) == 20
        assert sorted(os.listdir(os.path.join(env["root"], "images"))) == images_before
        assert sorted(os.listdir(os.path.join(env["root"], "objects"))) == objects_before
        for lease in leases:   # each merged dir is its own overlay mount of the same erofs image
            assert os.path.ismount(lease.merged)
        (gate / "go").write_text("")
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        (gate / "go").touch()
        for p in procs:
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0] * 20, results[0]
    assert all(out == "3\n" for out, _ in results)
    assert_nothing_left(env)


def test_runtime_crun_failure_is_reported_and_cleaned_up(env):
    """--runtime crun: crun 1.8 refuses this machine's hybrid cgroup layout; whatever the runtime
    does, the container either runs or fails with one clear line, and nothing is left behind."""
    require_tool("crun")
    r = cli(env, "run", "--rm", "--runtime", "crun", "bb", "--", "sh", "-c", "exit 0")
    assert "Traceback" not in r.stderr
    assert r.returncode == 0 or (r.returncode == 3 and "crun create" in r.stderr), r.stderr
    assert_nothing_left(env)
    r = cli(env, "run", "--rm", "--runtime", "nosuch", "bb")
    assert r.returncode == 2
    r = cli(env, "run", "-d", "-t", "bb")
    assert r.returncode == 3 and "-t with -d" in r.stderr
    assert_nothing_left(env)


def test_netlink_sets_lo_in_another_namespace():
    """net.Loopback/NoNetwork change `lo` over netlink (pyroute2) in the namespace of a process, not in
    ours: a fresh namespace (lo down) gets lo up, then down again; the host's lo is untouched."""
    require_root()
    from flatmount.run import net
    host_flags = net.link_flags(os.getpid())
    p = subprocess.Popen(["unshare", "--net", "sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{p.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not net.link_flags(p.pid) & net.IFF_UP
        up = net.Loopback()
        up.setup(p.pid)
        assert up.changed is True and net.link_flags(p.pid) & net.IFF_UP
        up2 = net.Loopback()
        up2.setup(p.pid)
        assert up2.changed is False
        down = net.NoNetwork()
        down.setup(p.pid)
        assert down.changed is True and not net.link_flags(p.pid) & net.IFF_UP
        assert net.link_flags(os.getpid()) == host_flags
    finally:
        p.kill()
        p.wait()
    with pytest.raises(net.NetworkError):
        net.network("bridge")


def test_cli_run_imports_nothing_heavy(env):
    """A warm `run --net loopback|none` needs neither the image writer/reader nor pyroute2 (lo is as
    wanted: one ioctl says so) nor tomllib (confinement cached); `--help` loads no container module."""
    heavy = {"flatmount.image.writer", "flatmount.image.reader", "flatmount.pull", "flatmount.sources.layers",
             "zstandard", "tarfile", "pyroute2", "hypothesis", "tomllib"}
    assert cli(env, "run", "--rm", "bb", "--", "true").returncode == 0   # confinement cached
    e = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-X", "importtime", "-m", "flatmount", "--root", env["root"], "--runroot",
            env["runroot"]]
    r = subprocess.run([*base, "run", "--rm", "bb", "--", "true"], capture_output=True, text=True,
                       cwd=str(ROOT), env=e, timeout=60)
    assert r.returncode == 0, r.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if "|" in line}
    assert "flatmount.run.container" in imported and imported & heavy == set()
    # --net none joins a namespace made beforehand, where lo was never up: no netlink needed either
    r = subprocess.run([*base, "run", "--rm", "--net", "none", "bb", "--", "cat", "/sys/class/net/lo/flags"],
                       capture_output=True, text=True, cwd=str(ROOT), env=e, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not int(r.stdout, 16) & 1
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if "|" in line}
    assert imported & heavy == set()
    r = subprocess.run([*base, "--help"], capture_output=True, text=True, cwd=str(ROOT), env=e, timeout=60)
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if "|" in line}
    assert imported & {"flatmount.run.container", "flatmount.run.runspec", "flatmount.run.bundle", "flatmount.run.net",
                       "subprocess", "pyroute2"} == set()
    assert_nothing_left(env)


def test_stop_and_rm_force_of_an_attached_container(env):
    """`stop` of a container whose `flatmount run` is waiting: the runner sees the exit (SIGTERM is
    ignored by a pid 1 without a handler, so SIGKILL after -t) and cleans up itself."""
    p = _popen_run(env, "--rm", "--name", "att", "bb", "--", "sleep", "60")
    try:
        _wait_file(os.path.join(env["runroot"], "containers", "att", "init.pid"))
        r = cli(env, "stop", "-t", "1", "att")
        assert r.returncode == 0, r.stderr
        p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGKILL
    assert_nothing_left(env)
    p = _popen_run(env, "--name", "att2", "bb", "--", "sleep", "60")
    try:
        _wait_file(os.path.join(env["runroot"], "containers", "att2", "init.pid"))
        assert cli(env, "rm", "att2").returncode == 3
        r = cli(env, "rm", "-f", "att2")
        assert r.returncode == 0, r.stderr
        p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGKILL
    assert_nothing_left(env)


def test_sigterm_at_any_point_cleans_up_without_cleanup(env):
    """SIGTERM to `flatmount run` at random points: before the container runs it unwinds (exit 3,
    everything undone), after that it is forwarded (the container exits 9); never a leftover."""
    import random

    rnd = random.Random(7)
    script = "trap 'exit 9' TERM; while :; do sleep 0.05; done"
    codes = set()
    for i in range(15):
        p = _popen_run(env, "--rm", "--name", f"t{i}", "bb", "--", "sh", "-c", script)
        if i % 5 == 4:   # surely running: the forwarding path
            _wait_file(os.path.join(env["runroot"], "containers", f"t{i}", "init.pid"))
            time.sleep(0.3)
        else:
            time.sleep(rnd.uniform(0.05, 1.2))
        p.send_signal(signal.SIGTERM)
        _out, err = _communicate(env, p, 60)
        assert p.returncode in (-signal.SIGTERM, 3, 9), err
        assert "Traceback" not in err
        codes.add(p.returncode)
        assert_nothing_left(env)
    assert 9 in codes


def test_confinement_cache_follows_its_sources(tmp_path, monkeypatch):
    """The cached caps/sysctls/seccomp are reused while the sources are unchanged and computed again
    when one changes (here: a containers.conf that drops CAP_KILL)."""
    from flatmount.run import runspec
    conf = tmp_path / "containers.conf"
    conf.write_text('[containers]\ndefault_capabilities = ["CHOWN", "KILL"]\n')
    monkeypatch.setattr(runspec, "CONTAINERS_CONF", (str(conf),))
    first = runspec.confinement(str(tmp_path / "cache"))
    assert first["caps"] == ["CAP_CHOWN", "CAP_KILL"]
    assert (tmp_path / "cache" / "confinement.json").is_file()
    assert runspec.confinement(str(tmp_path / "cache")) == first
    assert not any("chroot" in s["names"] and s["action"] == "SCMP_ACT_ALLOW" for s in first["seccomp"]["syscalls"])
    conf.write_text('[containers]\ndefault_capabilities = ["CHOWN", "SYS_CHROOT"]\n')
    os.utime(conf, ns=(1, 1))
    second = runspec.confinement(str(tmp_path / "cache"))
    assert second["caps"] == ["CAP_CHOWN", "CAP_SYS_CHROOT"]
    assert any("chroot" in s["names"] and s["action"] == "SCMP_ACT_ALLOW" for s in second["seccomp"]["syscalls"])
    monkeypatch.setattr(runspec, "CONTAINERS_CONF", (str(tmp_path / "absent.conf"),))
    assert runspec.confinement()["caps"] == ["CAP_" + c for c in runspec.DEFAULT_CAPS]


def test_bundle_remove_trusts_no_path_outside_the_bundle(env, tmp_path):
    """A record edited to name paths elsewhere (a stub outside the bundle, another mount's lease)
    makes `bundle --remove` refuse, removing nothing."""
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    d = tmp_path / "b"
    assert cli(env, "bundle", "bb", str(d)).returncode == 0
    rec_path = d / "flatmount-bundle.json"
    good = json.loads(rec_path.read_text())
    try:
        rec_path.write_text(json.dumps({**good, "stubs": [str(d / "stubs" / ".." / ".." / "victim")]}))
        r = cli(env, "bundle", "--remove", str(d))
        assert r.returncode == 3 and "outside" in r.stderr
        assert victim.read_text() == "keep me"
        with open_store(env["root"], runroot=env["runroot"]) as store:
            other = store.mount("bb")
            other_merged = other.__enter__()
            try:
                lease = next(m for m in store.mounts() if m.merged == other_merged)
                rec_path.write_text(json.dumps({**good, "lease": lease.id}))
                r = cli(env, "bundle", "--remove", str(d))
                assert r.returncode == 3 and "not its mount" in r.stderr
                assert os.path.ismount(other_merged)
            finally:
                other.__exit__(None, None, None)
    finally:
        rec_path.write_text(json.dumps(good))
        assert cli(env, "bundle", "--remove", str(d)).returncode == 0
    assert_nothing_left(env)


def test_bundle_net_none_for_runc_alone(env, tmp_path):
    """A `--net none` bundle run by runc alone has `lo` down too: its createRuntime hook takes down
    the `lo` that runc raises; a loopback bundle keeps it up and needs no hook."""
    for mode, want_up, hooks in (("none", False, True), ("loopback", True, False)):
        d = tmp_path / mode
        assert cli(env, "bundle", "bb", str(d), "--net", mode, "-u", "0", "--", "cat",
                   "/sys/class/net/lo/flags").returncode == 0
        try:
            assert ("hooks" in json.loads((d / "config.json").read_text())) == hooks
            p = subprocess.run(["runc", "--root", str(tmp_path / "runc"), "run", "-b", str(d), f"h{mode}"],
                               capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
            assert p.returncode == 0, p.stderr
            assert bool(int(p.stdout, 16) & 1) == want_up
        finally:
            assert cli(env, "bundle", "--remove", str(d)).returncode == 0
    assert_nothing_left(env)


def test_kill9_of_bundle_then_remove_leaves_nothing(env, tmp_path):
    """`flatmount bundle` killed with SIGKILL at random points: `bundle --remove` of whatever record
    it left (finding a lease it had not recorded yet by pid, boot and time) and `cleanup` leave no
    mount and no lease."""
    import random

    rnd = random.Random(3)
    e = {**os.environ, "PYTHONPATH": str(ROOT)}
    dirs = []
    for i in range(12):
        d = tmp_path / f"b{i}"
        p = subprocess.Popen([sys.executable, "-m", "flatmount", "--root", env["root"], "--runroot",
                              env["runroot"], "bundle", "demo", str(d)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=e, cwd=str(ROOT))
        time.sleep(rnd.uniform(0.05, 0.5))
        p.kill()
        p.wait()
        dirs.append(d)
    for d in dirs:
        if (d / "flatmount-bundle.json").exists():
            r = cli(env, "bundle", "--remove", str(d))
            assert r.returncode == 0, r.stderr
        elif d.exists():
            assert os.listdir(d) == [] or all(n.startswith(".tmp-") for n in os.listdir(d))
    assert cli(env, "cleanup").returncode == 0
    assert_nothing_left(env)


def test_bundle_records_its_rootfs_before_making_it(env, tmp_path, monkeypatch):
    """The rootfs dir is made only once the record names it: a bundle killed between the two must
    leave nothing `bundle --remove` does not know of (its dir could not be removed: ENOTEMPTY); one
    killed right after recording it is removed cleanly."""
    from flatmount.kernel.kmount import umount_image
    from flatmount.run import bundle as bundlemod

    d = tmp_path / "b"
    seen = []
    real_mkdir = os.mkdir

    def mkdir(path, *a, **kw):
        if os.fspath(path) == str(d / "rootfs"):
            seen.append(json.loads((d / "flatmount-bundle.json").read_text()).get("rootfs"))
        return real_mkdir(path, *a, **kw)

    monkeypatch.setattr(bundlemod.os, "mkdir", mkdir)
    with open_store(env["root"], runroot=env["runroot"]) as store:
        b = bundlemod.create_bundle(store, "demo", str(d))
        try:
            assert seen == [str(d / "rootfs")] and b.root == str(d / "rootfs")
            umount_image(b.root)  # as if killed between recording the rootfs and making it
            os.rmdir(b.root)
        except BaseException:
            bundlemod.remove_bundle(store, b.dir)
            raise
    r = cli(env, "bundle", "--remove", str(d))
    assert r.returncode == 0, r.stderr
    assert not d.exists()
    assert_nothing_left(env)


def test_bundle_remove_finds_a_lease_its_creator_did_not_record(env, tmp_path):
    """Killed after mounting, before recording the lease: the record has no lease id; the lease of
    the dead creator (same pid and boot, created after the record) is found and released."""
    d = tmp_path / "b"
    assert cli(env, "bundle", "bb", str(d)).returncode == 0
    rec_path = d / "flatmount-bundle.json"
    rec = json.loads(rec_path.read_text())
    rec_path.write_text(json.dumps({**rec, "lease": None}))
    with open_store(env["root"], runroot=env["runroot"]) as store:
        [lease] = store.mounts()
        assert lease.pid == rec["owner_pid"] and lease.id == rec["lease"]
    r = cli(env, "bundle", "--remove", str(d))
    assert r.returncode == 0, r.stderr
    assert not d.exists()
    assert_nothing_left(env)
