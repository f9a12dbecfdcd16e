"""flatmount.record: a `@record` class behaves as the same declaration under `@dataclass(frozen=True)`
(construction, errors, repr, equality, hash, immutability, the `dataclasses` functions), and the
store/mount records built with it keep what issue 16 promised."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flatmount.record import field, record, replace


def _pair():
    """The same declaration as a record and as a frozen dataclass (both named `P`)."""

    @record
    class P:
        """A point."""

        a: int
        b: str | None
        c: tuple = ()
        d: int | None = field(default=None, compare=False)
        e: list = field(default_factory=list, repr=False)

    R = P

    @dataclasses.dataclass(frozen=True)
    class P:  # noqa: F811 - the twin
        """A point."""

        a: int
        b: str | None
        c: tuple = ()
        d: int | None = dataclasses.field(default=None, compare=False)
        e: list = dataclasses.field(default_factory=list, repr=False)

    return R, P


R, D = _pair()
values = st.one_of(st.none(), st.integers(), st.text(max_size=5), st.floats(allow_nan=True),
                   st.tuples(st.integers()), st.lists(st.integers(), max_size=2))


def _same(f):
    """f(R) and f(D) give the same result, or raise the same exception type and message."""
    out = []
    for cls in (R, D):
        try:
            out.append(("ok", f(cls)))
        except Exception as e:  # noqa: BLE001 - compared below
            out.append((type(e).__name__, str(e).replace("_pair.<locals>.", "")))
    assert out[0] == out[1]
    return out[0]


@given(values, values, values, values, values, values, values, values)
def test_record_behaves_as_a_frozen_dataclass(a, b, c, d, a2, b2, c2, d2):
    _same(lambda cls: repr(cls(a, b, c, d)).replace("_pair.<locals>.", ""))
    _same(lambda cls: cls(a, b, c, d) == cls(a2, b2, c2, d2))
    _same(lambda cls: cls(a, b, c, d) == cls(a, b, c, d2))     # d is not compared
    _same(lambda cls: cls(a, b) != cls(a2, b2))
    _same(lambda cls: hash(cls(a, b, c, d)) == hash(cls(a, b, c, d2)))
    _same(lambda cls: hash(cls(a, b, c)))
    _same(lambda cls: cls(a, b=b) == cls(b=b, a=a))
    _same(lambda cls: cls(a, b, c) == (a, b, c))
    _same(lambda cls: dataclasses.asdict(cls(a, b, c, d)))
    _same(lambda cls: dataclasses.astuple(cls(a, b, c, d)))
    _same(lambda cls: dataclasses.replace(cls(a, b, c, d), b=b2) == cls(a, b2, c, d))
    x = R(a, b, c, d)
    assert replace(x, c=c2) == dataclasses.replace(x, c=c2) and replace(x, c=c2).c == c2
    assert copy.copy(x) == x and copy.deepcopy(x) == x


def test_record_errors_are_the_dataclass_errors():
    for f in (lambda cls: cls(), lambda cls: cls(1), lambda cls: cls(1, 2, 3, 4, [], 6),
              lambda cls: cls(1, 2, a=1), lambda cls: cls(1, 2, z=1),
              lambda cls: setattr(cls(1, 2), "a", 3), lambda cls: setattr(cls(1, 2), "new", 3),
              lambda cls: delattr(cls(1, 2), "b"), lambda cls: dataclasses.replace(cls(1, 2), z=1),
              lambda cls: hash(cls(1, [2]))):
        kind, _ = _same(f)
        assert kind != "ok"
    with pytest.raises(dataclasses.FrozenInstanceError):
        R(1, 2).a = 5
    assert R(1, 2).e == [] and R(1, 2).e is not R(1, 2).e   # a fresh default per instance


def test_post_init_runs_after_the_fields_as_a_dataclass_runs_it():
    """A record's `__post_init__` sees every field set (defaults too) and may refuse the values; a
    replace() runs it again, as `dataclasses.replace` does."""
    seen = []

    def make(deco):
        class Q:
            a: int
            b: tuple = ()

            def __post_init__(self) -> None:
                seen.append((self.a, self.b))
                if self.a < 0:
                    raise ValueError(f"negative a {self.a}")
        return deco(Q)

    for Q, repl in ((make(record), replace), (make(dataclasses.dataclass(frozen=True)), dataclasses.replace)):
        seen.clear()
        q = Q(1)
        assert seen == [(1, ())]
        with pytest.raises(ValueError, match="negative a -2"):
            Q(-2, (3,))
        assert seen[-1] == (-2, (3,))
        assert repl(q, b=(4,)).b == (4,) and seen[-1] == (1, (4,))
        with pytest.raises(ValueError, match="negative a -1"):
            repl(q, a=-1)


def test_record_class_is_a_dataclass_to_the_dataclasses_module():
    assert dataclasses.is_dataclass(R) and dataclasses.is_dataclass(R(1, 2))
    assert R.__dataclass_params__.frozen
    rf, df = dataclasses.fields(R), dataclasses.fields(D)
    assert [(f.name, f.type, f.default, f.default_factory, f.compare, f.repr) for f in rf] == \
           [(f.name, f.type, f.default, f.default_factory, f.compare, f.repr) for f in df]
    assert R.__match_args__ == D.__match_args__ == ("a", "b", "c", "d", "e")
    assert R.c == D.c == () and not hasattr(R, "e") and R.d is None
    match R(1, "x"):
        case R(1, y):
            assert y == "x"
        case _:
            pytest.fail("no match")
    with pytest.raises(TypeError, match="non-default argument"):
        @record
        class Bad:
            a: int = 1
            b: int
    with pytest.raises(ValueError, match="mutable default"):
        @record
        class Bad2:
            a: list = []  # noqa: RUF012


def test_store_and_mount_records_keep_their_promises():
    """Issue 16: immutable, typed, equal by value, readable repr; the compare=False fields stay out."""
    from flatmount.flatten.imagecache import FlatImage
    from flatmount.kernel.kmount import MountEntry
    from flatmount.mount import CleanupResult
    from flatmount.store.config import StoreConfig
    from flatmount.store.leases import Lease
    from flatmount.store.records import ImageRecord, LayerRecord, RemovedImage

    for cls in (FlatImage, MountEntry, CleanupResult, StoreConfig, Lease, ImageRecord, LayerRecord,
                RemovedImage):
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, cls
        assert "dataclasses" not in cls.__init__.__module__
    layer = LayerRecord("a" * 64, None, "sha256:" + "b" * 64, None, None, 5, None, "/s", "/s/l.erofs")
    assert layer == replace(layer, inodes=3, image_digest="c" * 64)   # compare=False, as before
    assert hash(layer) == hash(replace(layer, inodes=3))
    assert pickle.loads(pickle.dumps(layer)) == layer and copy.deepcopy(layer) == layer
    assert [f.name for f in dataclasses.fields(LayerRecord) if not f.compare] == ["inodes", "image_digest"]
    assert repr(StoreConfig()) == "StoreConfig(root=None, runroot=None, additional=(), path=None)"
    lease = Lease("i", "d", None, "/m", 1, "b", 2.0)
    assert lease.live and replace(lease, stale_reason="x").live is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        lease.merged = "/elsewhere"  # type: ignore[misc]
