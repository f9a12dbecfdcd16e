"""Hostile layers.json / images.json: every bad input is one FlatmountError line (CLI: exit 3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_cstorage import _image, make_cstore, make_layers

from flatmount.errors import FormatError
from flatmount.sources.cstorage import CStorage

ROOT = Path(__file__).resolve().parent.parent
IMG = "ab" * 32
DEEP = b"[" * 200_000 + b"]" * 200_000


def _store(tmp_path: Path, layers: list[dict] | None = None, images: list[dict] | None = None) -> Path:
    layers = make_layers("l0") if layers is None else layers
    images = [_image(IMG, layers[-1]["id"], "localhost/x:latest")] if images is None else images
    return make_cstore(tmp_path / "cs", layers, images)


def _resolve(store: Path) -> None:
    cs = CStorage([store])
    with cs.reading():
        cs.layer_chain(cs.resolve_image("x").top_layer)


@pytest.mark.parametrize("which", ["overlay-layers/layers.json", "overlay-images/images.json"])
def test_deeply_nested_json(tmp_path, which):
    store = _store(tmp_path)
    (store / which).write_bytes(DEEP)
    with pytest.raises(FormatError, match="nested too deeply"):
        _resolve(store)


LAYER_BAD = [("names", 5), ("names", [1, 2]), ("names", "abc"), ("parent", 7), ("diff-digest", 3),
             ("created", []), ("flags", "incomplete"), ("uidmap", 5), ("uidmap", [{"container_id": "0"}]),
             ("compressed-size", "10"), ("diff-size", True)]
IMAGE_BAD = [("names", 5), ("names", [None]), ("digests", 5), ("digests", [1]), ("layer", 9),
             ("digest", {}), ("big-data-names", 1), ("created", 1.5)]


@pytest.mark.parametrize("key,value", LAYER_BAD)
def test_layer_fields_of_wrong_type(tmp_path, key, value):
    layers = make_layers("l0")
    layers[0][key] = value
    store = _store(tmp_path, layers)
    with pytest.raises(FormatError, match=f"'{key}'|uidmap") as e:
        _resolve(store)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key,value", IMAGE_BAD)
def test_image_fields_of_wrong_type(tmp_path, key, value):
    layers = make_layers("l0")
    img = _image(IMG, layers[-1]["id"], "localhost/x:latest")
    img[key] = value
    store = _store(tmp_path, layers, [img])
    with pytest.raises(FormatError, match=f"'{key}'") as e:
        _resolve(store)
    assert "\n" not in str(e.value)


def _cli_pull(tmp_path: Path, graphroot: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CONTAINERS_STORAGE_CONF": str(tmp_path / "none.conf")}
    (tmp_path / "none.conf").write_text(f'[storage]\ngraphroot = "{graphroot}"\n')
    return subprocess.run([sys.executable, "-m", "flatmount", "--root", str(tmp_path / "store"),
                           "--runroot", str(tmp_path / "run"), "pull", "containers-storage:x"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["deep-layers", "deep-images", "names-number", "digests-number"])
def test_cli_exit_3_without_traceback(tmp_path, case):
    layers = make_layers("l0")
    img = _image(IMG, layers[-1]["id"], "localhost/x:latest")
    if case == "names-number":
        img["names"] = 12
    if case == "digests-number":
        img["digests"] = 12
    store = _store(tmp_path, layers, [img])
    if case == "deep-layers":
        (store / "overlay-layers" / "layers.json").write_bytes(DEEP)
    if case == "deep-images":
        (store / "overlay-images" / "images.json").write_bytes(DEEP)
    if case == "names-number":  # the image is found by id then; names are still read (and refused)
        (store / "overlay-images" / "images.json").write_text(json.dumps([img]))
    p = _cli_pull(tmp_path, store)
    assert p.returncode == 3, p.stderr
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_manifest_deeply_nested_is_ignored_for_config_lookup(tmp_path):
    """A deeply nested manifest big-data item is not a traceback (the config is then not found)."""
    layers = make_layers("l0")
    img = _image(IMG, layers[-1]["id"], "localhost/x:latest")
    store = make_cstore(tmp_path / "cs", layers, [img], big={(IMG, "manifest"): DEEP})
    cs = CStorage([store])
    with cs.reading():
        assert cs.image_config(cs.resolve_image("x")) is None
