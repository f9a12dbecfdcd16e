"""The README's first command: `flatmount demo` runs the whole data flow and leaves nothing behind."""

from __future__ import annotations

import re

from conftest import require_root

from flatmount.cli import main


def _overlay_mounts(where: str = "") -> list[str]:
    """overlay/erofs mounts of the demo (its temp dirs, or `where`): other processes on the machine
    mount and unmount their own meanwhile, which says nothing about what the demo left."""
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if (" - overlay " in line or " - erofs " in line)
                and ("flatmount-demo-" in line or (where and where in line))]


def test_demo_runs_end_to_end(tmp_path, capsys):
    require_root()
    before = _overlay_mounts(str(tmp_path))
    assert main(["demo", "--root", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    # mounted privately read-only, real files read through the mount
    assert re.search(r"mount options: ro,nosuid,nodev", out)
    assert "| PRETTY_NAME=\"Demo Linux 1.1 (flatmount example)\"" in out
    assert "/etc/motd" not in out.split("== 4.")[1].split("== 5.")[0].split("(18 entries")[0]
    # the diff between the two tags, computed without mounting
    diff = out.split("== 5.")[1].split("== 6.")[0]
    for line in ("A /etc/demo-release", "D /etc/motd", "D /usr/bin/greet", "A /opt/app/main.py"):
        assert line in diff
    # usage: the base's objects are all shared with demo, which adds exactly main.py (87 bytes)
    assert re.search(r"demo:latest\s+total\s+5794\s+unique\s+87\s+shared\s+5707", out)
    assert "leases left: 0" in out
    assert _overlay_mounts(str(tmp_path)) == before
