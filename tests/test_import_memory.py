"""Peak memory of the end of an import of many small files (issue 17): the layer image, its tree
cache and the object list are built one after another, each freed before the next, and the tree
cache is encoded column by column (no row tuples, no table of every column at once)."""

from __future__ import annotations

import hashlib
import os
import tracemalloc

from flatmount.api import open_store
from flatmount.image.tree import Inode
from flatmount.image.treecache import tree_cache_bytes
from flatmount.image.writer import image_bytes
from flatmount.store.batch import ImportBatch, tree_objects

FILES = 20_000


def _tree() -> Inode:
    """A layer of many small external files, like a tar of 50,000 files of 1-8 KB."""
    root = Inode.directory()
    for d in range(FILES // 1000):
        sub = Inode.directory(mtime_ns=1_700_000_000 * 10**9)
        root.entries[f"d{d:03d}".encode()] = sub
        for i in range(1000):
            n = d * 1000 + i
            sub.entries[f"f{n:06d}".encode()] = Inode(
                0o100644, size=1000 + n % 7000, digest=hashlib.sha256(n.to_bytes(4, "little")).digest(),
                mtime_ns=1_700_000_000 * 10**9)
    return root


def _peak(fn, *args, **kw) -> tuple[int, object]:
    """Bytes allocated at the peak of `fn(*args, **kw)` beyond what was allocated before it."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = fn(*args, **kw)
        return tracemalloc.get_traced_memory()[1] - base, result
    finally:
        tracemalloc.stop()


def test_tree_cache_encode_peak_is_near_its_output():
    tree = _tree()
    peak, out = _peak(tree_cache_bytes, tree, "00" * 32, 1)
    # the output and one copy of it (the header prepended), one column, the walk's lists; before:
    # a tuple of 13 values per row and all 13 columns at once on top (about 5x the output)
    assert peak < 3 * len(out) + (1 << 20), (peak, len(out))


def test_add_layer_holds_one_big_buffer_at_a_time(tmp_path):
    tree = _tree()
    p_img, img = _peak(image_bytes, tree)
    p_tc, _ = _peak(tree_cache_bytes, tree, hashlib.sha256(img).hexdigest(), len(img))
    p_objs, _ = _peak(tree_objects, tree)
    del img
    store = open_store(str(tmp_path / "store"), runroot=str(tmp_path / "run"), config=os.devnull,
                       additional=[])
    with ImportBatch(store) as batch:
        p_add, lid = _peak(batch.add_layer, tree, parent=None, diff_id="sha256:" + "ab" * 32)
        staged = os.listdir(batch.staging)
    assert f"layer-{lid}.erofs" in staged and f"layer-{lid}.tree" in staged
    # before: the image was held while the tree cache was built, and the object list while both were
    assert p_add < max(p_img, p_tc, p_objs) * 1.15 + (512 << 10), (p_add, p_img, p_tc, p_objs)
