"""objects.paths' hex rules decide as the patterns they replaced in gc, usage, the sources and the
store (`[0-9a-f]{64}`, `sha256:[0-9a-f]{64}`, and ranges of lengths)."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from objects.paths import is_hex, is_sha256_digest

HEXISH = st.text(alphabet="0123456789abcdefABCDEFg:sha256\n ", max_size=80)
NEAR = st.builds(lambda h, pre, tail: pre + h + tail,
                 st.text(alphabet="0123456789abcdef", min_size=60, max_size=68),
                 st.sampled_from(["", "sha256:", "sha256", "SHA256:", "sha512:"]),
                 st.sampled_from(["", "\n", " ", "A", "0"]))


@given(st.one_of(HEXISH, NEAR))
@settings(max_examples=2000, deadline=None)
def test_hex_rules_decide_as_their_patterns(text):
    assert is_hex(text, 64) == (re.fullmatch(r"[0-9a-f]{64}", text) is not None)
    assert is_hex(text, 3, 64) == (re.fullmatch(r"[0-9a-f]{3,64}", text) is not None)
    assert is_sha256_digest(text) == (re.fullmatch(r"sha256:[0-9a-f]{64}", text) is not None)


def test_a_digest_that_is_not_text_is_not_one():
    assert not is_sha256_digest(None) and not is_sha256_digest(b"sha256:" + b"0" * 64)
