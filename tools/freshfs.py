"""A fresh, loop-mounted file system of the same kind as the one a benchmark would otherwise use.

Why: the small-files benchmark compares a pull with `tar -x` + `sync -f` of the same tar, and both
allocate 50,000 inodes.  ext4 without a journal (the root file system of these VMs) passes over
inodes freed in the last minute or more when it allocates new ones (fs/ext4/ialloc.c,
recently_deleted()), so after any big delete on the machine (another engineer's tests, an earlier
round) `tar -x` took 14-22 s of system CPU instead of ~2 s, and the ratio meant nothing.  A file
system made a moment ago has no recently deleted inodes and no history: every measurement starts
from the same state.

The fresh file system copies the original's type, features and mount options: `tune2fs -l` where it
can read the device, else mke2fs's defaults for the type with the journal as the kernel reports it
(/sys/fs/ext4/DEV/journal_task).  It is a sparse image file on the original file system (so its
writes still reach the same disk), attached to a loop device with direct I/O (one page cache, as
for a file system on the disk itself), made with its inode tables written out at once (no
background ext4lazyinit while timing).  Needs root and ext2/3/4; `describe()` says why not, and the
caller then measures on the original file system as before.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

IMAGE_BYTES = 4 << 30  # sparse: only what is written takes space (a 50,000-file round: ~0.5 GB)
# superblock state, not features one chooses at mkfs
_STATE_FEATURES = {"needs_recovery", "orphan_present", "orphan_file", "mmp"}


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def describe(path: Path) -> dict:
    """How a fresh file system like the one holding `path` would be made: `usable` with `fstype`,
    `mkfs_features` (None: mke2fs's defaults), `features_from`, `journal`, `mount_options`; or
    `usable` False with `why`."""
    src, fstype, options = _run("findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "--target", str(path)).split()
    info: dict = {"original": {"source": src, "fstype": fstype, "options": options}}
    if os.geteuid() != 0:
        return info | {"usable": False, "why": "not root: cannot attach loop devices or mount"}
    if fstype not in ("ext2", "ext3", "ext4"):
        return info | {"usable": False, "why": f"{fstype}: only ext2/3/4 are copied"}
    features = None
    try:
        out = _run("tune2fs", "-l", src)
        line = next(x for x in out.splitlines() if x.startswith("Filesystem features:"))
        features = [f for f in line.split(":", 1)[1].split() if f not in _STATE_FEATURES]
        how = f"tune2fs -l {src}"
    except (subprocess.CalledProcessError, StopIteration, FileNotFoundError) as e:
        err = getattr(e, "stderr", "") or str(e)
        how = (f"mke2fs defaults for {fstype} (tune2fs -l {src} failed: "
               f"{err.strip().splitlines()[0] if err.strip() else e})")
    dev = os.path.basename(os.path.realpath(src))
    journal = None
    if features is not None:
        journal = "has_journal" in features
    else:
        with contextlib.suppress(OSError):
            journal = Path(f"/sys/fs/ext4/{dev}/journal_task").read_text().strip() not in ("", "<none>")
        how += f"; journal {'yes' if journal else 'no'} from /sys/fs/ext4/{dev}/journal_task"
    return info | {"usable": True, "fstype": fstype, "mkfs_features": features, "features_from": how,
                   "journal": journal, "mount_options": options, "image_bytes": IMAGE_BYTES,
                   "loop_direct_io": True}


def _mkfs_args(desc: dict) -> list[str]:
    args = ["mkfs." + desc["fstype"], "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard"]
    if desc["mkfs_features"] is not None:
        args += ["-O", ",".join(["none", *desc["mkfs_features"]])]
    elif desc["journal"] is False:
        args += ["-O", "^has_journal"]
    return args


@contextlib.contextmanager
def fresh(image: Path, desc: dict) -> Iterator[Path]:
    """A new file system as `describe` gave, mounted at `image` + `.mnt` while the block runs;
    unmounted and detached afterwards, even on errors (the image file is left to the caller, so a
    benchmark can delete them all at once, after its measurements: deleting GBs on a `discard` file
    system makes the disk trim for a while)."""
    with open(image, "wb") as f:
        f.truncate(IMAGE_BYTES)
    _run(*_mkfs_args(desc), str(image))
    mnt = Path(str(image) + ".mnt")
    mnt.mkdir()
    loop = _run("losetup", "--find", "--show", "--direct-io=on", str(image)).strip()
    try:
        _run("mount", "-t", desc["fstype"], "-o", desc["mount_options"], loop, str(mnt))
        try:
            yield mnt
        finally:
            _run("umount", str(mnt))
    finally:
        _run("losetup", "-d", loop)
        mnt.rmdir()
