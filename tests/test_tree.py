"""The tree model: keyword construction of `Inode`, the one path lookup."""

from __future__ import annotations

import ast
import stat
from pathlib import Path

import pytest

from flatmount.image.tree import Inode, lookup, lookup_parts

REPO = Path(__file__).resolve().parent.parent


def test_inode_copy():
    node = Inode(stat.S_IFREG | 0o644, uid=1000, gid=100, mtime_ns=5, size=3, content=b"abc",
                 xattrs={b"user.a": b"1"})
    copy = node.copy()
    assert copy == node and copy is not node and copy.xattrs is not node.xattrs


def test_no_positional_inode_calls_in_the_project():
    """Every `Inode(...)` call in the package, the tools and the tests passes fields by keyword,
    so each value says which field it is."""
    bad = []
    for top in ("flatmount", "tools", "tests"):
        for path in sorted((REPO / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Inode"
                        and len(node.args) > 1):
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert bad == []


def test_lookup_parts():
    root = Inode.directory()
    sub = root.entries[b"d"] = Inode.directory()
    f = sub.entries[b"f"] = Inode.file(b"x")
    assert lookup_parts(root, []) is root
    assert lookup_parts(root, [b"d", b"f"]) is f
    assert lookup_parts(root, [b"d", b"missing"]) is None
    assert lookup_parts(root, [b"d", b"f", b"below-a-file"]) is None
    assert lookup(root, "/d/f/") is f
    with pytest.raises(ValueError):
        lookup(root, "d/../d")
