"""tools/freshfs.py: the small-files benchmark's fresh file system per measurement, made like the work
dir's, mounted, and gone afterwards (unmounted, loop device detached) even when the block fails."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import import_tool, require_root, require_tool


def _freshfs():
    return import_tool("freshfs")


def _loops_of(image: Path) -> str:
    return subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True, check=True).stdout


def test_fresh_file_system_like_the_work_dirs(tmp_path: Path) -> None:
    require_root()
    require_tool("mkfs.ext4")
    freshfs = _freshfs()
    desc = freshfs.describe(tmp_path)
    if desc["original"]["fstype"] not in ("ext2", "ext3", "ext4"):
        assert desc["usable"] is False and "only ext2/3/4" in desc["why"]
        return
    assert desc["usable"], desc
    image = tmp_path / "fs.img"
    with freshfs.fresh(image, desc) as mnt:
        fstype, options = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,OPTIONS", str(mnt)], capture_output=True,
                                         text=True, check=True).stdout.split()
        assert fstype == desc["fstype"]
        assert set(desc["mount_options"].split(",")) <= set(options.split(","))
        (mnt / "x").write_bytes(b"x")  # writable
        loop = _loops_of(image)
        assert loop
        dump = subprocess.run(["dumpe2fs", "-h", loop.split(":", 1)[0]], capture_output=True, text=True).stdout
        features = next(x for x in dump.splitlines() if x.startswith("Filesystem features:")).split()
        assert ("has_journal" in features) == bool(desc["journal"])
    assert not mnt.exists() and _loops_of(image) == ""
    with pytest.raises(RuntimeError), freshfs.fresh(tmp_path / "fs2.img", desc) as mnt2:
        raise RuntimeError("a failed measurement")
    assert not mnt2.exists() and _loops_of(tmp_path / "fs2.img") == ""
