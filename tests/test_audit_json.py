"""Audit of issue 13 item 12 (hostile JSON) for image configs from registries and OCI layouts (one
parser, oci._parse_json): NaN/Infinity are Python's extension, not JSON; a config holding one was
imported and then every `inspect --json` of it printed invalid JSON.  Refused on import, one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from tests.tarbuild import Tar


def _layout(path, config: bytes) -> None:
    t = Tar(root=False)
    t.file("f", b"abc", mtime=3)
    layer = t.bytes()
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict:
        h = hashlib.sha256(data).hexdigest()
        (blobs / h).write_bytes(data)
        return {"digest": "sha256:" + h, "size": len(data)}

    diff = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = config.replace(b"DIFF", diff.encode())
    man = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **put(config)},
           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **put(layer)}]}
    desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", **put(json.dumps(man).encode()),
            "annotations": {"org.opencontainers.image.ref.name": "v1"}}
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


@pytest.mark.parametrize("const", [b"NaN", b"Infinity", b"-Infinity"])
def test_config_with_nan_is_refused(tmp_path, const):
    _layout(tmp_path / "oci", b'{"architecture": "amd64", "os": "linux", "created": ' + const
            + b', "rootfs": {"type": "layers", "diff_ids": ["DIFF"]}}')
    r = subprocess.run([sys.executable, "-m", "flatmount", "--root", str(tmp_path / "s"), "--runroot",
                        str(tmp_path / "r"), "pull", f"oci:{tmp_path / 'oci'}:v1", "--name", "x"],
                       capture_output=True, text=True, timeout=60, cwd=str(ROOT),
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 3 and r.stderr.count("\n") == 1, r.stderr
    assert "LayerError" in r.stderr and "not a JSON value" in r.stderr, r.stderr
