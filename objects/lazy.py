"""Names a package loads from its modules on first use (PEP 562): the one `__getattr__` every lazy
package of flatmount uses, so that `import flatmount` and CLI start-up load only what they need."""

from __future__ import annotations

from importlib import import_module

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: see objects/__init__.py)
if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable
    from typing import Any


def lazy_names(package: str, namespace: dict[str, Any], table: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: `table` maps each lazy name to the module that has it
    (absolute, or relative to `package` with a leading dot; "module:attr" when the attribute is named
    differently, "module:" for the module itself).  A loaded name is kept in `namespace` (the package's
    globals), so it is looked up only once."""

    def __getattr__(name: str) -> Any:
        try:
            where = table[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        module, _, attr = where.partition(":")
        loaded = import_module(module, package)
        value = loaded if where.endswith(":") else getattr(loaded, attr or name)
        namespace[name] = value
        return value

    return __getattr__
