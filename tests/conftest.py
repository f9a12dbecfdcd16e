"""Shared test helpers: tools and privileges are required in CI (CI=true) and may skip only elsewhere."""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str) -> str:
    """Path of an external tool; a missing tool fails under CI and skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        msg = f"{name} is not installed (.ci/run installs it)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


# The only test input the repository does not hold: composefs dumps of composefs's own test trees
# (github.com/containers/composefs tests/assets/cs9-x86_64-{minimal,developer}.json.gz, written out
# with mkcomposefs and `composefs-info dump`), kept beside the repository as ../shared/data.
SHARED_DATA = Path(os.environ.get("FLATMOUNT_DATA", ROOT.parent / "shared" / "data"))


def shared_data(name: str) -> Path:
    """Path of a shared data file; missing, the test fails (never skips) saying what and where."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.fail(f"shared test data {name} is missing: expected at {path} ($FLATMOUNT_DATA or "
                    "../shared/data beside the repository); it is composefs's tests/assets/"
                    f"{name.replace('.dump.gz', '.json.gz')} (github.com/containers/composefs) as a "
                    "composefs dump (mkcomposefs, then composefs-info dump, gzipped)")
    return path


def import_tool(name: str) -> ModuleType:
    """A module of tools/ (scripts beside each other, not a package), imported with tools/ on
    sys.path only while it loads."""
    tools = str(ROOT / "tools")
    sys.path.insert(0, tools)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(tools)


def compiled_missing(name: str) -> NoReturn:
    """A compiled module (built by `pip install -e .` where a C compiler is) is not there: a failure
    under CI (the pure-Python fallback would hide a broken build), a skip elsewhere."""
    msg = f"{name} is not built (pip install -e . builds it with a C compiler)"
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)


def require_compiled(name: str) -> ModuleType:
    """The compiled module `name` itself, whatever FLATMOUNT_PURE says (its tests compare both paths)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        compiled_missing(name)


def require_native() -> None:
    """The compiled block loop (objects/_fsverity.c) is built by `pip install -e .` where a C compiler
    is; under CI its absence is a failure (the fallback would hide a broken build)."""
    from objects.digest import NATIVE

    if not NATIVE:
        compiled_missing("objects._fsverity")


def require_root() -> None:
    """Real mounts need root; under CI not being root is a failure."""
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("tests that mount must run as root in CI")
        pytest.skip("needs root")


# a wrapper that runs the CLI as `python -m flatmount` does and then lists every module it imported
_LIST_MODULES = ("import atexit, runpy, sys\n"
                 "before = set(sys.modules)\n"
                 "atexit.register(lambda: sys.stderr.write('MODULES ' + ' '.join(sorted(set(sys.modules) - before))))\n"
                 "sys.argv = ['flatmount'] + sys.argv[1:]\n"
                 "runpy.run_module('flatmount', run_name='__main__', alter_sys=True)\n")


def cli_modules(*args: str, timeout: float = 120):
    """`flatmount ARGS` in a new interpreter without site (-S, so that no module the environment
    preloads, a .pth file's, hides one): (the CompletedProcess, the modules it imported)."""
    import site
    import subprocess

    path = os.pathsep.join([str(ROOT), *site.getsitepackages(), site.getusersitepackages()])
    r = subprocess.run([sys.executable, "-S", "-c", _LIST_MODULES, *args], capture_output=True, text=True,
                       cwd=str(ROOT), timeout=timeout, env={**os.environ, "PYTHONPATH": path})
    line = next((x for x in r.stderr.splitlines() if x.startswith("MODULES ")), "MODULES ")
    return r, set(line.split()[1:])


# Under CI the property tests run a fixed (derandomized) set of examples, so a landing is judged on the
# same inputs every time; elsewhere they explore new random examples on every run.
try:
    from hypothesis import settings as _hsettings

    _hsettings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
    if IN_CI:
        _hsettings.load_profile("ci")
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    pass


@pytest.fixture
def registry(tmp_path):
    """A real registry (Debian's docker-registry) on a free port of 127.0.0.1, stopped after the test."""
    from tests.registry_fixtures import Registry

    reg = Registry(tmp_path / "registry")
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def cstore(tmp_path):
    """A podman store with one image whose layer has tar-split data (tests.test_cstorage_verify.CStore)."""
    from tests.test_cstorage_verify import CStore

    s = CStore(tmp_path)
    try:
        yield s
    finally:
        s.close()
