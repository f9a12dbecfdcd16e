"""Peak memory of the end of an import of many small files (issue 17): add_layer builds the layer
image, then the object list, each freed before the next (the list kept as the refs rows' blob of
digests only), then a thread builds the tree cache (from the end of add_layer, beside commit's
SQLite inserts), and nothing else big is built; the tree cache is encoded column by column (no row
tuples, no table of every column at once)."""

from __future__ import annotations

import hashlib
import os
import tracemalloc

from flatmount.api import open_store
from flatmount.image.tree import Inode
from flatmount.image.treecache import tree_cache_bytes
from flatmount.image.writer import image_bytes
from flatmount.store.batch import ImportBatch, _refs_blob, tree_objects
from objects.digest import fsverity_digest

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
                0o100644, size=1000 + n % 7000, digest=fsverity_digest(_content(n)),
                mtime_ns=1_700_000_000 * 10**9)
    return root


def _content(n: int) -> bytes:
    return n.to_bytes(4, "little")


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


def test_import_end_holds_one_big_buffer_at_a_time(tmp_path):
    tree = _tree()
    p_img, img = _peak(image_bytes, tree)
    p_tc, _ = _peak(tree_cache_bytes, tree, hashlib.sha256(img).hexdigest(), len(img))
    p_objs, objs = _peak(tree_objects, tree)
    p_refs, _ = _peak(_refs_blob, set(objs), set())
    del img, objs
    store = open_store(str(tmp_path / "store"), runroot=str(tmp_path / "run"), config=os.devnull,
                       additional=[])
    with ImportBatch(store) as batch:
        with batch.objects.bulk() as bulk:
            bulk.put_many([_content(n) for n in range(FILES)])
        batch.objects.finish_bulks()  # (their reports are not add_layer's memory)
        p_add, lid = _peak(batch.add_layer, tree, parent=None, diff_id="sha256:" + "ab" * 32)
        p_commit, _ = _peak(batch.commit)
    assert sorted(os.listdir(store.layers_dir)) == [f"{lid}.erofs", f"{lid}.tree"]
    # before: the image was held while the tree cache was built, and the object list while both were
    assert p_add < max(p_img, p_objs + p_refs) * 1.15 + (512 << 10), (p_add, p_img, p_objs, p_refs)
    assert p_commit < p_tc * 1.15 + (1 << 20), (p_commit, p_tc)
