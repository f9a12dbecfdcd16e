"""c/storage paths that are symlinks (diff dir, layer dir, overlay/, overlay-layers/, JSON, lock and
big-data files) are refused, never followed: the store controls them, not the user."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_cstorage import _diff, _image, make_cstore, make_layers

from flatmount.api import open_store
from flatmount.errors import FlatmountError
from flatmount.sources import cstorage

ROOT = Path(__file__).resolve().parent.parent
CONFIG = json.dumps({"rootfs": {"type": "layers", "diff_ids": [_diff("l0")]}}).encode()
IMG = hashlib.sha256(CONFIG).hexdigest()      # c/storage image id = config digest
SECRET = b"host secret that must never be imported\n" * 3


def _cstore(tmp_path: Path) -> tuple[Path, str]:
    layers = make_layers("l0")
    store = make_cstore(tmp_path / "cs", layers, [_image(IMG, layers[0]["id"], "localhost/x:latest")],
                        big={(IMG, "sha256:" + IMG): CONFIG, (IMG, "manifest"): b"{}"})
    (store / "overlay" / layers[0]["id"] / "diff" / "ok").write_text("fine\n")
    outside = tmp_path / "outside"        # stands for /etc/ssh: a host directory
    outside.mkdir()
    (outside / "ssh_host_key").write_bytes(SECRET)
    return store, layers[0]["id"]


def _replace_with_link(path: Path, target: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.copytree(path, target, symlinks=True, dirs_exist_ok=True)
        shutil.rmtree(path)
    elif path.exists():
        if not target.exists():
            shutil.copy2(path, target)
        path.unlink()
    os.symlink(target, path)


def _pull(tmp_path: Path, store: Path):
    conf = tmp_path / "storage.conf"
    conf.write_text(f'[storage]\ngraphroot = "{store}"\n')
    fm = open_store(tmp_path / "fm", runroot=tmp_path / "run")
    try:
        return cstorage.pull_cstorage(fm, "containers-storage:x", storage_conf=conf)
    finally:
        fm.close()


def _no_secret_imported(tmp_path: Path) -> None:
    for dirpath, _dirs, files in os.walk(tmp_path / "fm"):
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                with open(p, "rb") as fh:
                    assert SECRET not in fh.read(), p


def test_plain_store_pulls(tmp_path):
    store, _lid = _cstore(tmp_path)
    rec = _pull(tmp_path, store)
    assert rec.id == IMG


def test_graph_root_itself_may_be_a_symlink(tmp_path):
    store, _lid = _cstore(tmp_path)
    link = tmp_path / "graphroot-link"
    os.symlink(store, link)
    assert _pull(tmp_path, link).id == IMG


@pytest.mark.parametrize("what", ["diff", "layer-dir", "overlay"])
def test_symlinked_diff_dir_is_refused(tmp_path, what):
    store, lid = _cstore(tmp_path)
    outside = tmp_path / "outside"
    if what == "diff":
        shutil.rmtree(store / "overlay" / lid / "diff")
        os.symlink(outside, store / "overlay" / lid / "diff")
    elif what == "layer-dir":
        (outside / "diff").mkdir()
        (outside / "diff" / "ssh_host_key").write_bytes(SECRET)
        shutil.rmtree(store / "overlay" / lid)
        os.symlink(outside, store / "overlay" / lid)
    else:
        (outside / lid / "diff").mkdir(parents=True)
        (outside / lid / "diff" / "ssh_host_key").write_bytes(SECRET)
        shutil.rmtree(store / "overlay")
        os.symlink(outside, store / "overlay")
    with pytest.raises(FlatmountError, match="symbolic link"):
        _pull(tmp_path, store)
    _no_secret_imported(tmp_path)


@pytest.mark.parametrize("rel", ["overlay-layers", "overlay-layers/layers.json", "overlay-layers/layers.lock",
                                 "overlay-images", "overlay-images/images.json", "overlay-images/images.lock",
                                 f"overlay-images/{IMG}", f"overlay-images/{IMG}/manifest"])
def test_symlinked_metadata_is_refused(tmp_path, rel):
    store, _lid = _cstore(tmp_path)
    _replace_with_link(store / rel, tmp_path / "elsewhere")
    with pytest.raises(FlatmountError, match="symbolic link|not a regular file"):
        _pull(tmp_path, store)


def test_cli_symlinked_diff_exit_3(tmp_path):
    store, lid = _cstore(tmp_path)
    shutil.rmtree(store / "overlay" / lid / "diff")
    os.symlink(tmp_path / "outside", store / "overlay" / lid / "diff")
    conf = tmp_path / "storage.conf"
    conf.write_text(f'[storage]\ngraphroot = "{store}"\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CONTAINERS_STORAGE_CONF": str(conf)}
    p = subprocess.run([sys.executable, "-m", "flatmount", "--root", str(tmp_path / "fm"), "--runroot",
                        str(tmp_path / "run"), "pull", "containers-storage:x"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 3, p.stderr
    assert "symbolic link" in p.stderr and "Traceback" not in p.stderr
    _no_secret_imported(tmp_path)


@pytest.mark.parametrize("rel", ["overlay-layers/layers.json", "overlay-images/images.json",
                                 f"overlay-images/{IMG}/manifest"])
def test_fifo_instead_of_a_file_is_refused_without_blocking(tmp_path, rel):
    store, _lid = _cstore(tmp_path)
    (store / rel).unlink()
    os.mkfifo(store / rel)
    with pytest.raises(FlatmountError, match="not a regular file"):
        _pull(tmp_path, store)
