"""Image names as a store records and resolves them: ONE rule, the reference grammar podman uses
(flatmount.reference), for every name a store records (`tag`, pull `--name`, a source's own names)
and for the names a reference may mean.

A stored name always carries a tag or digest: `foo` is stored as `foo:latest` (`normalise_name`).
`name_candidates(ref)` lists what a user's reference may mean: as given, with `:latest`, then with
`localhost/` in front (as containers/storage resolves short names locally).
"""

from __future__ import annotations

from flatmount.errors import StoreError
from flatmount.reference import check_reference


def normalise_name(name: str) -> str:
    """The stored form of an image name (StoreError, saying what the grammar allows, for a name
    podman would refuse): `:latest` appended when it has neither tag nor digest."""
    check_reference(name)
    if "@" in name:
        return name
    if ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name


def name_candidates(ref: str) -> list[str]:
    """Names `ref` may mean: as given, with `:latest`, with `localhost/` in front."""
    out = [ref]
    try:
        full = normalise_name(ref)
    except StoreError:
        return out
    if full != ref:
        out.append(full)
    first = full.split("/", 1)[0]
    if "/" not in full or not ("." in first or ":" in first or first == "localhost"):
        out.append("localhost/" + full)
    return out
