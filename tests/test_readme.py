"""The README's two commands work on a fresh Debian 12 (system python3, PEP 668) as written: a venv
made from /usr/bin/python3, the demo after an editable and after a plain install (the example is
package data), CI running the README's test command, and an sdist that carries its tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import ROOT, SHARED_DATA, require_root

SYSTEM_PYTHON = "/usr/bin/python3"
# a PATH on which `python3` is the system one, as on a fresh Debian 12 (no pyenv, no ~/.local)
SYSTEM_PATH = "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "__pycache__", "*.so", "*.egg-info",
                                     ".pytest_cache", ".hypothesis", ".ruff_cache", ".benchmarks",
                                     "bench-results*.json")


def readme_commands() -> list[str]:
    """The two commands of the README's first code block, without their comments."""
    text = (ROOT / "README.md").read_text()
    block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    cmds = [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]
    assert len(cmds) == 2, cmds
    return cmds


def _require_system_python() -> None:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.fail(f"{SYSTEM_PYTHON} is missing: this test checks the README on Debian's own python3")


def _copy_repo(dest: Path) -> Path:
    shutil.copytree(ROOT, dest, ignore=COPY_IGNORE, symlinks=True)
    return dest


def _sh(cmd: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYENV", "VIRTUAL_ENV"))}
    env["PATH"] = SYSTEM_PATH
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _check_demo_output(out: str) -> None:
    assert "mount options: ro,nosuid,nodev" in out
    assert '| PRETTY_NAME="Demo Linux 1.1 (flatmount example)"' in out
    for line in ("A /etc/demo-release", "D /etc/motd", "D /usr/bin/greet", "A /opt/app/main.py"):
        assert line in out
    assert "leases left: 0" in out


def _demo_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if "flatmount-demo-" in line]


def test_readme_first_command_in_a_fresh_venv_of_the_system_python(tmp_path):
    require_root()
    _require_system_python()
    first, _ = readme_commands()
    assert ".venv/bin/" in first and "pip install" in first   # PEP 668: never the system site
    repo = _copy_repo(tmp_path / "flatmount")
    r = _sh(first, repo)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _check_demo_output(r.stdout)
    base = subprocess.run([str(repo / ".venv/bin/python"), "-c", "import sys; print(sys.base_prefix)"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert base == "/usr"                                      # made from Debian's python3
    assert _demo_mounts() == []


def test_demo_after_a_plain_install_uses_the_packaged_example(tmp_path):
    require_root()
    _require_system_python()
    repo = _copy_repo(tmp_path / "src")
    venv = tmp_path / "venv"
    r = _sh(f"python3 -m venv {venv} && {venv}/bin/pip install -q {repo}", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.rmtree(repo)                                        # nothing may come from the source tree
    r = _sh(f"{venv}/bin/flatmount demo", tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _check_demo_output(r.stdout)
    assert "site-packages/flatmount/examples/demo-oci" in r.stdout
    assert _demo_mounts() == []


def test_ci_runs_the_readme_test_command():
    _, second = readme_commands()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    steps = [s.strip() for s in second.split("&&")]
    at = [ci.index(s) for s in steps]                          # each step is a line of .ci/run ...
    assert at == sorted(at)                                    # ... in the README's order
    deps = (ROOT / "tools" / "install-deps.sh").read_text()
    assert "python3 -m venv .venv" in deps and "python3-venv" in deps


def _build_extensions(top: Path) -> None:
    """Compile the optional C modules of pyproject.toml in place, as `pip install` would build them (the
    tests run the compiled and the pure-Python code both, and under CI a missing module fails)."""
    import sysconfig
    import tomllib

    conf = tomllib.loads((top / "pyproject.toml").read_text())
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    for ext in conf["tool"]["setuptools"]["ext-modules"]:
        out = top / (ext["name"].replace(".", "/") + suffix)
        cmd = ["cc", "-O2", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}",
               *[str(top / src) for src in ext["sources"]], "-o", str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]


def test_sdist_carries_its_tests_and_they_pass(tmp_path):
    repo = _copy_repo(tmp_path / "src")
    r = subprocess.run([sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path / "dist"), str(repo)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (sdist,) = (tmp_path / "dist").glob("flatmount-*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
        tf.extractall(tmp_path / "x", filter="data")
    for need in ("tests/conftest.py", "tests/test_oci.py", "tools/bench_erofs.py", "tools/install-deps.sh",
                 ".ci/run", "objects/_fsverity.c", "flatmount/image/_cwrite.c",
                 "flatmount/examples/demo-oci/index.json"):
        assert need in names, need
    (top,) = (tmp_path / "x").iterdir()
    _build_extensions(top)
    env = dict(os.environ, PYTHONPATH=str(top), FLATMOUNT_DATA=str(SHARED_DATA))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_oci.py",
                        "tests/test_clidoc.py", "tests/test_dump.py"], cwd=top, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:]


def test_readme_is_for_users_and_names_every_subcommand():
    from flatmount.cli import build_parser
    from flatmount.cli.manpage import _subcommands

    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 200
    for name, _, _ in _subcommands(build_parser()):
        assert f"`{name}" in text, name
    for doc in ("docs/design.md", "docs/benchmarks.md"):
        assert (ROOT / doc).is_file() and doc in text
