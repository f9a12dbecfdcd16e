"""Frozen record classes without `dataclasses` at import time (CLI start-up, issue 17).

`@record` turns a class with annotated fields into what `@dataclass(frozen=True)` makes of it:
keyword or positional `__init__` with defaults (then `__post_init__`, if the class has one), a
readable `__repr__`, equality and hash by value over the compared fields, `__match_args__`, and
`FrozenInstanceError` on assignment or deletion.
The methods are shared closures over the field list: no source is generated, compiled or inspected,
so defining a record costs a few microseconds instead of importing `inspect` (about 28 M
instructions) and compiling each class's methods (about 4 M each).

The classes still ARE dataclasses to the `dataclasses` module (`is_dataclass`, `fields`, `asdict`,
`replace`, `__dataclass_params__.frozen`): `__dataclass_fields__` and `__dataclass_params__` are
built on first use, by applying the real `dataclass(frozen=True)` to a copy of the declaration, so
only a caller that asks for them pays for `dataclasses`.
"""

from __future__ import annotations

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: CLI start-up, see objects/lazy.py)


if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, dataclass_transform
else:
    def dataclass_transform(**_: object):
        return lambda f: f

__all__ = ["MISSING", "field", "record", "replace"]


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class _FieldSpec:
    """What `field()` declares: a default (or a factory) and whether the field is compared/shown."""

    __slots__ = ("compare", "default", "default_factory", "repr")

    def __init__(self, default: Any, default_factory: Any, compare: bool, repr: bool) -> None:
        self.default, self.default_factory, self.compare, self.repr = default, default_factory, compare, repr


def field(*, default: Any = MISSING, default_factory: Any = MISSING, compare: bool = True,
          repr: bool = True) -> Any:
    """`dataclasses.field` for a `@record` (the options records use: default, default_factory,
    compare, repr)."""
    if default is not MISSING and default_factory is not MISSING:
        raise ValueError("cannot specify both default and default_factory")
    return _FieldSpec(default, default_factory, compare, repr)


def _frozen_error(message: str) -> Exception:
    import dataclasses

    return dataclasses.FrozenInstanceError(message)


class _DataclassView:
    """Class attribute that answers `__dataclass_fields__` / `__dataclass_params__` on first access
    (then replaces itself on the class with the real value)."""

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def __get__(self, obj: object, cls: type) -> Any:
        fields, params = _dataclass_view(cls)
        type.__setattr__(cls, "__dataclass_fields__", fields)
        type.__setattr__(cls, "__dataclass_params__", params)
        return fields if self.attr == "__dataclass_fields__" else params


def _dataclass_view(cls: type) -> tuple[dict, Any]:
    """The `__dataclass_fields__` and `__dataclass_params__` that `@dataclass(frozen=True)` gives the
    same declaration (made on a throwaway class, so ours keeps its own methods)."""
    import dataclasses

    ns: dict[str, Any] = {"__annotations__": dict(cls.__record_types__), "__module__": cls.__module__,
                          "__qualname__": cls.__qualname__}
    for name, spec in cls.__record_specs__.items():
        if spec is None:
            continue
        kw: dict[str, Any] = {"compare": spec.compare, "repr": spec.repr}
        if spec.default_factory is not MISSING:
            kw["default_factory"] = spec.default_factory
        elif spec.default is not MISSING:
            kw["default"] = spec.default
        ns[name] = dataclasses.field(**kw)
    shadow = dataclasses.dataclass(frozen=True)(type(cls.__name__, (), ns))
    return dict(shadow.__dataclass_fields__), shadow.__dataclass_params__


def _is_classvar(annotation: Any) -> bool:
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return text.startswith(("ClassVar", "typing.ClassVar", "t.ClassVar"))


def _missing_text(missing: list[str]) -> str:
    """The words CPython uses for missing arguments (a record's errors read as a dataclass's)."""
    names = [repr(m) for m in missing]
    if len(names) == 1:
        return f"missing 1 required positional argument: {names[0]}"
    listed = f"{names[0]} and {names[1]}" if len(names) == 2 else ", ".join(names[:-1]) + f", and {names[-1]}"
    return f"missing {len(names)} required positional arguments: {listed}"


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def record(cls: type) -> type:
    """Make `cls` a frozen record (see the module docstring); its fields are its own annotations, in
    order, defaults from class attributes or `field()`.  Inheritance between records is not supported
    (no record needs it)."""
    own = cls.__dict__.get("__annotations__", {})
    types = {name: ann for name, ann in own.items() if not _is_classvar(ann)}
    names = tuple(types)
    specs: dict[str, _FieldSpec | None] = {}
    seen_default = False
    for name in names:
        value = cls.__dict__.get(name, MISSING)
        if isinstance(value, _FieldSpec):
            spec: _FieldSpec | None = value
        elif value is MISSING:
            spec = None
        else:
            spec = _FieldSpec(value, MISSING, True, True)
        has_default = spec is not None and (spec.default is not MISSING or spec.default_factory is not MISSING)
        if has_default:
            seen_default = True
        elif seen_default:
            raise TypeError(f"non-default argument {name!r} follows default argument")
        if spec is not None and spec.default is not MISSING and spec.default.__class__.__hash__ is None:
            raise ValueError(f"mutable default {type(spec.default)} for field {name} is not allowed: "
                             "use default_factory")
        specs[name] = spec
        if isinstance(value, _FieldSpec):   # as dataclasses: a plain default stays a class attribute
            if value.default is MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, value.default)
    compared = tuple(n for n in names if specs[n] is None or specs[n].compare)  # type: ignore[union-attr]
    shown = tuple(n for n in names if specs[n] is None or specs[n].repr)  # type: ignore[union-attr]
    defaults = {n: s for n, s in specs.items() if s is not None}
    nfields = len(names)
    field_set = frozenset(names)
    qualname = cls.__qualname__
    required = sum(1 for s in specs.values() if s is None or (s.default is MISSING and s.default_factory is MISSING))
    post_init = cls.__dict__.get("__post_init__")   # checks of the values, as a dataclass runs them
    takes = str(nfields + 1) if required == nfields else f"from {required + 1} to {nfields + 1}"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(args) > nfields:
            raise TypeError(f"{qualname}.__init__() takes {takes} positional arguments but "
                            f"{len(args) + 1} were given")
        values = dict(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key not in field_set:
                raise TypeError(f"{qualname}.__init__() got an unexpected keyword argument {key!r}")
            if key in values:
                raise TypeError(f"{qualname}.__init__() got multiple values for argument {key!r}")
            values[key] = value
        if len(values) < nfields:
            missing = []
            for n in names:
                if n in values:
                    continue
                spec = defaults.get(n)
                if spec is None:
                    missing.append(n)
                elif spec.default_factory is not MISSING:
                    values[n] = spec.default_factory()
                else:
                    values[n] = spec.default
            if missing:
                raise TypeError(f"{qualname}.__init__() {_missing_text(missing)}")
        d = self.__dict__
        for n in names:   # in declaration order, as a dataclass's __init__ assigns them
            d[n] = values[n]
        if post_init is not None:
            post_init(self)

    def __repr__(self) -> str:
        d = self.__dict__
        return f"{type(self).__qualname__}({', '.join(f'{n}={d[n]!r}' for n in shown)})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        a, b = self.__dict__, other.__dict__
        return tuple([a[n] for n in compared]) == tuple([b[n] for n in compared])

    def __hash__(self) -> int:
        d = self.__dict__
        return hash(tuple(d[n] for n in compared))

    def __setattr__(self, name: str, value: Any) -> None:
        if type(self) is cls or name in field_set:
            raise _frozen_error(f"cannot assign to field {name!r}")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if type(self) is cls or name in field_set:
            raise _frozen_error(f"cannot delete field {name!r}")
        object.__delattr__(self, name)

    for fn in (__init__, __repr__, __eq__, __hash__, __setattr__, __delattr__):
        fn.__qualname__ = f"{qualname}.{fn.__name__}"
        setattr(cls, fn.__name__, fn)
    cls.__match_args__ = names
    cls.__record_types__ = types
    cls.__record_specs__ = specs
    cls.__dataclass_fields__ = _DataclassView("__dataclass_fields__")
    cls.__dataclass_params__ = _DataclassView("__dataclass_params__")
    if cls.__doc__ is None:
        cls.__doc__ = f"{cls.__name__}({', '.join(names)})"
    return cls


def replace(obj: Any, /, **changes: Any) -> Any:
    """`dataclasses.replace` for a `@record` (a new record with `changes`), without importing it."""
    specs = type(obj).__record_specs__
    d = obj.__dict__
    return type(obj)(**{n: changes.pop(n) if n in changes else d[n] for n in specs}, **changes)
