"""tools/regen_pins.py: rewrites flatmount's own pins from their trees, never composefs's."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tests.pin_trees import PINS_FILE

TOOL = Path(__file__).resolve().parent.parent / "tools" / "regen_pins.py"
WRONG = "0" * 64


def _tool():
    spec = importlib.util.spec_from_file_location("regen_pins", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pins(tmp_path: Path, **wrong: str) -> tuple[Path, dict]:
    doc = json.loads(PINS_FILE.read_text())
    for name, kind in wrong.items():
        doc[kind][name.replace("_", "-")] = WRONG
    path = tmp_path / "pins.json"
    path.write_text(json.dumps(doc))
    return path, json.loads(PINS_FILE.read_text())


def test_regen_rewrites_our_pin(tmp_path, capsys):
    path, good = _pins(tmp_path, every_type="flatmount", empty="flatmount")
    assert _tool().main(["--check", "--pins", str(path), "every-type", "empty", "layer"]) == 1
    assert json.loads(path.read_text())["flatmount"]["empty"] == WRONG   # --check writes nothing
    assert _tool().main(["--pins", str(path), "every-type", "empty", "layer"]) == 0
    doc = json.loads(path.read_text())
    assert doc == good   # the recomputed values are the pins in the repository, the rest untouched
    assert "rewritten flatmount every-type" in capsys.readouterr().out


def test_regen_never_rewrites_a_composefs_pin(tmp_path, capsys):
    path, _ = _pins(tmp_path, no_newline="composefs")
    assert _tool().main(["--pins", str(path), "no-newline"]) == 1
    assert json.loads(path.read_text())["composefs"]["no-newline"] == WRONG
    assert "BROKEN" in capsys.readouterr().out


def test_regen_missing_data(tmp_path, capsys):
    path, _ = _pins(tmp_path)
    assert _tool().main(["--pins", str(path), "--data", str(tmp_path), "cs9-x86_64-minimal.dump.gz"]) == 2
    assert "missing" in capsys.readouterr().err
