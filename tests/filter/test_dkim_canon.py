"""The filter's faster replacements of dkimpy internals give exactly the library's results."""
import random

from hypothesis import given, settings, strategies as st

from filter import dkim as ours

WS = st.text(alphabet=" \t\r\nab", max_size=200).map(lambda s: s.encode())


@given(WS)
@settings(max_examples=500, deadline=None)
def test_canonicalization_equals_the_library(content):
    for name in ("compress_whitespace", "strip_trailing_whitespace"):
        assert getattr(ours, name)(content) == ours.LIBRARY[name](content), (name, content)


def test_integers_equal_the_library():
    rng = random.Random(7)
    for _ in range(500):
        n = rng.getrandbits(rng.choice((0, 1, 8, 9, 1024, 2048)))
        assert ours.int2str(n) == ours.LIBRARY["int2str"](n)
        for length in (1, 4, 128, 256, 300):
            assert ours.int2str(n, length) == ours.LIBRARY["int2str"](n, length)
        b = ours.int2str(n)
        assert ours.str2int(b) == ours.LIBRARY["str2int"](b)
