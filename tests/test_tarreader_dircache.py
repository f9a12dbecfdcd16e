"""LayerTreeBuilder's last-directory shortcut (issue 17): entries whose name starts with the last
entry's directory skip splitting and walking it again.  The tree and every error must be exactly
those of the full path (the shortcut turned off), whatever the names."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flatmount.errors import LayerError
from flatmount.image.tree import Inode, walk
from flatmount.sources import tarreader
from flatmount.sources.tarreader import LayerTreeBuilder


class _NoShortcut(LayerTreeBuilder):
    """The reference: the last directory is never remembered."""

    @property
    def _last_dir(self):
        return None

    @_last_dir.setter
    def _last_dir(self, value):
        pass


COMPONENTS = [b"a", b"b", b"c", b".", b"..", b"", b".wh.a", b".wh..wh..opq", b".wh.", b"x" * 256,
              b"n\0ul", b"d1", b"d2"]
names = st.lists(st.sampled_from(COMPONENTS), min_size=0, max_size=4).map(b"/".join)
prefixed = st.tuples(st.sampled_from([b"", b"/", b"./"]), names, st.sampled_from([b"", b"/"])).map(b"".join)


def _node(kind: str, i: int) -> Inode | None:
    if kind == "dir":
        return Inode(0o40700, uid=i, mtime_ns=i)
    if kind == "file":
        return Inode(0o100644, size=3, content=b"abc", uid=i, mtime_ns=i)
    if kind == "symlink":
        return Inode(0o120777, size=1, target=b"a", uid=i, mtime_ns=i)
    return None  # a hardlink


def _run(builder: LayerTreeBuilder, entries, batched: bool = False) -> tuple:
    """The tree (or the error) of `entries`; `batched`: each run of files and symlinks entered by one
    `add_files`, as `_fast_batch` does."""
    try:
        files: list = []
        for i, (name, kind, link) in enumerate(entries):
            node = _node(kind, i)
            if batched and kind in ("file", "symlink"):
                files.append((name, node))
                continue
            if files:
                builder.add_files(files)
                files = []
            builder.add(name, node, link=link if node is None else None, mtime_ns=i)
        if files:
            builder.add_files(files)
        root = builder.finish()
    except LayerError as e:
        return ("error", str(e))
    groups: dict[int, bytes] = {}
    shape = [(path, groups.setdefault(id(n), path)) for path, n in walk(root)]
    return ("tree", root, shape)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(prefixed, st.sampled_from(["dir", "file", "symlink", "link"]), names),
                max_size=12))
def test_shortcut_gives_the_tree_and_errors_of_the_full_path(entries):
    got, want = _run(LayerTreeBuilder("l"), entries), _run(_NoShortcut("l"), entries)
    assert got[0] == want[0]
    if got[0] == "error":
        assert got[1] == want[1]
    else:
        assert got[1] == want[1] and got[2] == want[2]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(prefixed, st.sampled_from(["dir", "file", "symlink", "link"]), names),
                max_size=12))
def test_add_files_gives_the_tree_and_errors_of_add(entries):
    got, want = _run(LayerTreeBuilder("l"), entries, batched=True), _run(_NoShortcut("l"), entries)
    assert got[0] == want[0]
    if got[0] == "error":
        assert got[1] == want[1]
    else:
        assert got[1] == want[1] and got[2] == want[2]


def test_add_files_enters_a_directory_s_files_without_add(monkeypatch):
    b = LayerTreeBuilder("l")
    b.add(b"d/e/f", Inode(0o100644, size=0))
    calls = []
    real = LayerTreeBuilder.add
    monkeypatch.setattr(LayerTreeBuilder, "add", lambda self, name, *a, **k: calls.append(name) or real(self, name, *a, **k))
    b.add_files([(b"d/e/g%d" % i, Inode(0o100644, size=0)) for i in range(100)] + [(b"d/x/y", Inode(0o100644))])
    assert calls == [b"d/x/y"]  # (another directory: through add, which walks to it)
    assert b.entries == 102 and len(b.finish().entries[b"d"].entries[b"e"].entries) == 101
    with pytest.raises(LayerError, match="duplicate entry"):
        b.add_files([(b"d/x/y", Inode(0o100644))])


def test_shortcut_is_taken_and_keeps_the_rules(monkeypatch):
    calls = []
    real = tarreader._split
    monkeypatch.setattr(tarreader, "_split", lambda name, where: calls.append(name) or real(name, where))
    b = LayerTreeBuilder("l")
    for i in range(100):
        b.add(b"d/e/f%d" % i, Inode(0o100644, size=0))
    assert len(calls) == 1  # only the first name was split
    for bad, why in ((b"d/e/..", "'..'"), (b"d/e/" + b"x" * 256, "longer than"), (b"d/e/f1", "duplicate"),
                     (b"d/e/a\0b", "NUL")):
        with pytest.raises(LayerError, match=why):
            b.add(bad, Inode(0o100644, size=0))
    b.add(b"d/e/.wh.f2", Inode(0o100644, size=0))  # a whiteout: the full path
    b.add(b"d/e/link", None, link=b"d/e/f3")
    tree = b.finish()
    assert tree.entries[b"d"].entries[b"e"].entries[b"link"] is tree.entries[b"d"].entries[b"e"].entries[b"f3"]
