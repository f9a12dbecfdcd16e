"""The shape of flatmount/image/: every on-disk layout (struct, size, field offset) is defined once, in
format.py, and the writer and reader are written as small functions over it."""

from __future__ import annotations

import ast
import struct
from pathlib import Path

import pytest

from flatmount.image import format as fmt

IMAGE = Path(__file__).resolve().parent.parent / "flatmount" / "image"
STRUCT_CALLS = {"Struct", "pack", "pack_into", "unpack", "unpack_from", "iter_unpack", "calcsize"}


@pytest.mark.parametrize("module", ["writer.py", "reader.py", "dump.py", "tree.py"])
def test_struct_layouts_only_in_format_py(module):
    """No struct format string outside format.py: `struct.X(...)` with X a struct function."""
    tree = ast.parse((IMAGE / module).read_text())
    calls = [f"{module}:{n.lineno}" for n in ast.walk(tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in STRUCT_CALLS
             and isinstance(n.func.value, ast.Name) and n.func.value.id == "struct"]
    assert calls == []


def test_no_long_parameter_lists():
    """The writer's emit once took 27 parameters: the passes now share a layout record instead."""
    long = []
    for path in sorted(IMAGE.glob("*.py")):
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.FunctionDef) and n.name != "__init__":
                a = n.args
                if len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) > 10:
                    long.append(f"{path.name}:{n.name}")
    assert long == []


def test_field_offsets_match_the_spec():
    """Offsets the reader's messages point at (EROFS.md section 2 and 3 tables)."""
    sb = fmt.SUPERBLOCK_AT
    assert (sb["checksum"], sb["blkszbits"], sb["root_nid"], sb["build_time_nsec"], sb["feature_incompat"],
            sb["dirblkbits"], sb["packed_nid"]) == (0x04, 0x0C, 0x0E, 0x20, 0x50, 0x5A, 0x60)
    assert fmt.INODE_COMPACT_AT["i_u"] == fmt.INODE_EXTENDED_AT["i_u"] == 0x10
    assert fmt.INODE_EXTENDED_AT["i_mtime_nsec"] == 0x28
    assert fmt.COMPOSEFS_HEADER_AT["version"] == 4
    assert (fmt.DIRENT_AT["nameoff"], fmt.DIRENT_AT["file_type"]) == (8, 10)


def test_codes_split_every_layout_as_struct_reads_it():
    """`field_offsets` walks a layout's codes without `re`: each code with its count, in order, the
    sizes adding up to the struct's."""
    layouts = [v for v in vars(fmt).values() if isinstance(v, struct.Struct)]
    assert len(layouts) > 10
    for st in layouts:
        codes = fmt._codes(st.format[1:])
        assert "".join(codes) == st.format[1:].replace(" ", "")
        assert sum(struct.calcsize(st.format[0] + c) for c in codes) == st.size   # (little-endian: no padding)
    assert fmt._codes("I 16sHx") == ["I", "16s", "H", "x"]


def test_records_are_named_tuples_of_their_layouts():
    """Each record class has one field per code of its struct, defaults that pack, and the named-tuple
    behaviour the reader and writer use (`_make` of an unpack, keyword construction, `*record` to pack),
    with wrong field counts or names refused."""
    pairs = [(fmt.COMPOSEFS_HEADER, fmt.ComposefsHeader), (fmt.SUPERBLOCK, fmt.Superblock),
             (fmt.INODE_COMPACT, fmt.InodeCompact), (fmt.INODE_EXTENDED, fmt.InodeExtended),
             (fmt.CHUNK_INDEX, fmt.ChunkIndex), (fmt.XATTR_IBODY_HEADER, fmt.XattrIbodyHeader),
             (fmt.XATTR_ENTRY, fmt.XattrEntry), (fmt.DIRENT, fmt.Dirent)]
    for st, rec in pairs:
        assert len(rec._fields) == len(fmt._codes(st.format[1:])), rec
        default = rec()
        assert isinstance(default, tuple) and list(default) == [rec._field_defaults[n] for n in rec._fields]
        assert rec._make(st.unpack(st.pack(*default))) == default
    sb = fmt.Superblock(root_nid=7, blocks=9)
    assert (sb.root_nid, sb.blocks, sb.magic) == (7, 9, fmt.SUPER_MAGIC)
    assert fmt.Superblock._make(fmt.SUPERBLOCK.unpack(fmt.SUPERBLOCK.pack(*sb))) == sb
    d = fmt.Dirent(5, 12, fmt.FileType.DIR)
    assert (d.nid, d.nameoff, d.file_type, d.reserved) == (5, 12, fmt.FileType.DIR, 0)
    assert repr(d) == "Dirent(nid=5, nameoff=12, file_type=2, reserved=0)"
    with pytest.raises(AttributeError):
        d.nid = 6
    for bad in (lambda: fmt.Dirent(1, 2, 3, 4, 5), lambda: fmt.Dirent(nids=1), lambda: fmt.Dirent(1, nid=1),
                lambda: fmt.Dirent._make((1, 2, 3))):
        with pytest.raises(TypeError):
            bad()


def test_derived_structs():
    assert fmt.dirents_struct(3).size == fmt.dirents_pack_struct(3).size == 3 * fmt.DIRENT_SIZE
    assert fmt.xattr_ids_struct(5).size == 5 * fmt.XATTR_ID_SIZE
    body = fmt.both_inline_struct(66)
    assert body.size == 2 * (fmt.XATTR_ENTRY_SIZE + 16) + fmt.METACOPY_SIZE + 66
    st = fmt.external_inode_struct(fmt.INODE_COMPACT_SIZE, [20, 40], 64, 4)
    assert st.size == fmt.INODE_COMPACT_SIZE + 64 + 4
    with pytest.raises(struct.error):
        fmt.LE16.pack(1 << 16)


def test_image_modules_do_not_import_their_package():
    """`from flatmount.image import format` imports the package, whose lazy attributes import the
    reader and writer back: a cycle.  The modules import each other by their full names."""
    bad = []
    for path in sorted(IMAGE.glob("*.py")):
        if path.name == "__init__.py":
            continue
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.ImportFrom) and n.module == "flatmount.image" and not n.level:
                bad.append(f"{path.name}:{n.lineno}")
    assert bad == []


def test_image_kind_tells_composefs_erofs_and_other():
    from flatmount.image.tree import Inode
    from flatmount.image.writer import image_bytes

    data = image_bytes(Inode.directory())
    assert fmt.image_kind(data) == "composefs"
    assert fmt.image_kind(bytes(4) + data[4:]) == "erofs"          # no composefs header magic
    assert fmt.image_kind(data[: fmt.KIND_PROBE - 1]) == "other"   # too short to hold the superblock magic
    assert fmt.image_kind(data[:1024] + bytes(4) + data[1028:]) == "other"
