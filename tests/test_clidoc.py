"""Shell completion and man page: built from the parser by the project, mentioning every subcommand,
valid for bash and groff, and actually completing."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT, require_tool

from flatmount.cli import build_parser
from flatmount.cli.manpage import _subcommands


def _build(tmp_path) -> tuple[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "flatmount.cli.manpage", str(tmp_path)], cwd=ROOT, env=env, check=True)
    return (tmp_path / "flatmount.1").read_text(), (tmp_path / "flatmount.bash").read_text()


def _names() -> list[str]:
    return [n for n, _, _ in _subcommands(build_parser())]


def test_man_page_lists_every_subcommand_and_renders(tmp_path):
    man, _ = _build(tmp_path)
    names = _names()
    assert len(names) > 15
    for name in names:
        assert f".SS flatmount {name}\n" in man, name
    for report in ("usage", "images", "refs", "top", "share"):
        assert f"\\fBobjects {report}\\fR" in man
    groff = require_tool("groff")
    r = subprocess.run([groff, "-man", "-Tutf8", "-ww", str(tmp_path / "flatmount.1")],
                       capture_output=True, text=True, check=True)
    assert r.stderr == ""                                   # no roff warnings
    text = re.sub(".\b", "", r.stdout)                    # overstrike bold/underline
    assert "flatmount umount" in text and "EXIT STATUS" in text


def _complete(script: str, *words: str) -> list[str]:
    bash = require_tool("bash")
    cmd = (f"source {script}; COMP_WORDS=({' '.join(repr(w) for w in words)}); "
           f"COMP_CWORD={len(words) - 1}; _flatmount; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
    r = subprocess.run([bash, "-c", cmd], capture_output=True, text=True, check=True)
    return r.stdout.split()


def test_bash_completion_is_valid_and_completes(tmp_path):
    _, comp = _build(tmp_path)
    script = str(tmp_path / "flatmount.bash")
    subprocess.run([require_tool("bash"), "-n", script], check=True)
    assert sorted(_complete(script, "flatmount", "")) == sorted(_names())
    assert _complete(script, "flatmount", "ob") == ["objects"]
    assert _complete(script, "flatmount", "objects", "r") == ["refs"]
    assert _complete(script, "flatmount", "umount", "--l") == ["--lazy"]
    assert "--force" in _complete(script, "flatmount", "rmi", "--")
    # `flatmount completion bash` prints the same script
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "flatmount", "completion", "bash"], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=True)
    assert r.stdout == comp
