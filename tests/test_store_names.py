"""Image names: one rule (podman's reference grammar, flatmount.reference) for every name a store
records, whichever way it arrives (pull --name, a source's own names, tag), and for resolution."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flatmount.api import open_store
from flatmount.cli import main
from flatmount.errors import StoreError
from flatmount.pull import pull
from flatmount.reference import check_reference
from flatmount.store.names import name_candidates, normalise_name
from tests.tarbuild import Tar

# accepted by the loose rule normalise_name had before (no blank, no control character, no leading
# '-' or '/', at most 512 characters), refused by podman's grammar: a store recorded names that
# `tag`, podman and skopeo refuse
REFUSED = ("Foo", "foo/Bar:1", "a..b", "foo:-tag", "foo:" + "t" * 129, "x" * 256, "foo_:1", "ünï")
ACCEPTED = {"foo": "foo:latest", "localhost:5000/foo": "localhost:5000/foo:latest", "foo:1.0": "foo:1.0",
            "quay.io/a/b_c-d:T_1": "quay.io/a/b_c-d:T_1", "foo@sha256:" + "a" * 64: "foo@sha256:" + "a" * 64}


@pytest.fixture
def store(tmp_path: Path):
    s = open_store(tmp_path / "store", runroot=tmp_path / "run", config=os.devnull, additional=[])
    yield s
    s.close()


def _tar(tmp_path: Path) -> str:
    t = Tar()
    t.file("etc/hello", b"hello" * 40)
    p = tmp_path / "layer.tar"
    p.write_bytes(t.bytes())
    return str(p)


def _names(store) -> list[str]:
    with sqlite3.connect(store.db_path) as db:
        return sorted(r[0] for r in db.execute("SELECT name FROM names"))


def test_stored_names_follow_the_reference_grammar():
    for name, stored in ACCEPTED.items():
        assert normalise_name(name) == stored
        check_reference(stored)       # what is stored is itself a valid reference
    for bad in REFUSED:
        with pytest.raises(StoreError, match="invalid image name"):
            check_reference(bad)
        with pytest.raises(StoreError, match="invalid image name"):
            normalise_name(bad)
        assert name_candidates(bad) == [bad]   # resolution: looked up as given, nothing invented


@pytest.mark.parametrize("bad", ["Foo", "a..b", "foo:-tag"])
def test_pull_refuses_a_name_tag_would_refuse(store, tmp_path, bad):
    """A pull's --name goes through the same rule as `tag`: nothing is recorded under a name podman
    would refuse (before, the pull recorded it and `tag` refused the very same name)."""
    with pytest.raises(StoreError, match="invalid image name"):
        pull(store, f"tar:{_tar(tmp_path)}", bad)
    assert not store.db_path.exists() or _names(store) == []
    r = pull(store, f"tar:{_tar(tmp_path)}", "good")
    assert r.image.names == ("good:latest",)
    with pytest.raises(StoreError, match="invalid image name"):
        store.tag("good", bad)
    assert _names(store) == ["good:latest"]


def test_cli_pull_with_a_bad_name_exits_3(tmp_path, capsys):
    rc = main(["--root", str(tmp_path / "store"), "--runroot", str(tmp_path / "run"), "--config", os.devnull,
               "pull", f"tar:{_tar(tmp_path)}", "--name", "Foo"])
    err = capsys.readouterr().err
    assert rc == 3 and "invalid image name 'Foo'" in err and "Traceback" not in err


def _whole_grammar_accepts(text: str) -> bool:
    import re

    from flatmount.reference import NAME_MAX, REFERENCE

    m = re.fullmatch(REFERENCE, text)
    return m is not None and text.isascii() and len(m.group("name")) <= NAME_MAX


def _check_accepts(text: str) -> bool:
    try:
        check_reference(text)
    except StoreError:
        return False
    return True


@pytest.mark.parametrize("text", [*ACCEPTED, *ACCEPTED.values(), *REFUSED, "a" * 255, "a" * 255 + ":t",
                                  "a-" * 120 + "b", "a__b", "a--b", "a.b_c-d:" + "T" * 128, "a:" + "T" * 129,
                                  "a:.t", "a:_t", "a:", ":t", "", "a\n", "a:t\n", "A", "ab:ü"])
def test_the_short_name_path_decides_as_the_whole_grammar(text):
    assert _check_accepts(text) == _whole_grammar_accepts(text)


@given(st.text(alphabet="ab09._-:/@Z\n ü", max_size=300))
@settings(max_examples=3000, deadline=None)
def test_the_short_name_path_decides_as_the_whole_grammar_on_random_names(text):
    assert _check_accepts(text) == _whole_grammar_accepts(text)


@given(st.one_of(st.text(alphabet="az09._-:Z\n \u00fc/@", max_size=140),
                 st.from_regex(r"[a-z0-9]{1,3}(?:[._-]{1,2}[a-z0-9]{1,3}){0,4}(?::[A-Za-z0-9_.-]{0,130})?",
                               fullmatch=True)))
@settings(max_examples=3000, deadline=None)
def test_is_short_decides_as_its_pattern(text):
    import re

    from flatmount.reference import SHORT, is_short

    assert is_short(text) == (re.fullmatch(SHORT, text) is not None)


@given(st.from_regex(r"[a-z0-9]{1,3}(?:[._-][a-z0-9]{1,3}){0,90}(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,130})?",
                     fullmatch=True))
@settings(max_examples=1000, deadline=None)
def test_names_of_the_short_form_are_valid_references(text):
    assert _check_accepts(text) == _whole_grammar_accepts(text)
